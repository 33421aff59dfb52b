"""Helpers for tests that run spear as real processes."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def spawn(*args: str, prefix: str | None = None, log_path=None) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    if prefix:
        env["SPEAR_SUBJECT_PREFIX"] = prefix
    stderr = open(log_path, "ab") if log_path else asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spear", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr
    )


async def wait_ready(process: asyncio.subprocess.Process, timeout: float = 30.0) -> str:
    """Read `spear up`'s ready line; return the NATS URL it reports."""
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    match = re.search(r"NATS (nats://\S+),", line.decode())
    assert match, f"unexpected ready line: {line!r}"
    return match.group(1)


async def stop(process: asyncio.subprocess.Process, timeout: float = 30.0) -> int:
    if process.returncode is None:
        process.terminate()
    return await asyncio.wait_for(process.wait(), timeout)


async def count_responders(nc, service_name: str, wait: float = 0.3) -> int:
    """How many instances of a NATS micro service answer a PING."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.{service_name}", b"", reply=inbox)
    count = 0
    try:
        while True:
            await sub.next_msg(timeout=wait)
            count += 1
    except Exception:
        return count
    finally:
        await sub.unsubscribe()
