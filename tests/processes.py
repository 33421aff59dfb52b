"""Helpers for tests that run spear as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys

import nats.errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def spawn(
    *args: str, prefix: str | None = None, log_path=None, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    env = {**os.environ, **(env or {})}
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
    """SIGTERM and wait; a process that does not stop in time is killed (and reported by its code)."""
    if process.returncode is None:
        process.send_signal(signal.SIGCONT)  # in case a test paused it
        process.terminate()
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        return await process.wait()


async def count_responders(nc, service_name: str, wait: float = 0.3) -> int:
    """How many instances of a NATS micro service answer a PING (distinct ids: a cluster still
    forming its routes may deliver a message twice; an empty status reply means no responders)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.{service_name}", b"", reply=inbox)
    ids = set()
    try:
        while True:
            msg = await sub.next_msg(timeout=wait)
            if msg.data:  # not the server's "no responders" status
                ids.add(json.loads(msg.data)["id"])
    except nats.errors.TimeoutError:
        return len(ids)
    finally:
        await sub.unsubscribe()


async def wait_for_pullers(nc, stream: str, consumer: str, count: int, timeout: float = 30.0) -> None:
    """Until `count` pull requests wait on the consumer: every worker is ready to take work."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        try:
            if (await nc.jetstream().consumer_info(stream, consumer)).num_waiting >= count:
                return
        except Exception:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} pull requests on {consumer}")
