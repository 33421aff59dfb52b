"""Helpers for tests that run spear as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import BinaryIO

import nats.errors

from spear.aio import DeadlinePassed, poll_until

# Ports picked here lie below the kernel's ephemeral range (where `--port -1` and bind(0) land), in
# a band of their own per pytest-xdist process: a port picked and released here, for a child to
# bind later, is not taken meanwhile by the other test process's servers (review26).
PORT_BAND = 2000
PORT_BANDS_FROM = 20000
_given: deque[int] = deque(maxlen=500)  # (a test picking several gets different ones)


def free_port() -> int:
    """A port free now on loopback, for a process to bind soon."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    low = PORT_BANDS_FROM + (int(worker) % 6 if worker.isdigit() else 0) * PORT_BAND
    for _ in range(1000):
        port = random.randrange(low, low + PORT_BAND)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.append(port)
        return port
    raise RuntimeError(f"no free port in {low}-{low + PORT_BAND}")


def _appending(path) -> BinaryIO:
    return open(path, "ab")  # a local file: opening it does not block the loop noticeably


async def spawn(
    *args: str, prefix: str | None = None, log_path=None, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    env = {**os.environ, **(env or {})}
    if prefix:
        env["SPEAR_SUBJECT_PREFIX"] = prefix
    if not log_path:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spear",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    with _appending(log_path) as stderr:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spear", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )


# A worker lost is noticed after 1 s (not 10) and retried after 50 ms.
FAST_RECOVERY = {"SPEAR_WORKER__ACK_WAIT_MS": "1000", "SPEAR_RETRY__INITIAL_BACKOFF_MS": "50"}


async def spawn_worker(
    stack: AsyncExitStack,
    nats_url: str,
    prefix: str,
    log_path,
    tasks: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """A `spear worker` process with fast recovery settings (and `env` over them), serving `tasks`
    (`mod:attr` specs; none: the demo), stopped when `stack` closes."""
    args = [arg for task in tasks for arg in ("--task", task)]
    process = await spawn(
        "worker", "--nats-url", nats_url, *args, prefix=prefix, log_path=log_path, env={**FAST_RECOVERY, **(env or {})}
    )
    stack.push_async_callback(stop, process)
    return process


def running(pid: int) -> bool:
    """Whether process `pid` runs (from /proc: a zombie has died, whoever is to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes() -> Iterator[tuple[int, list[str]]]:
    """Each process's id and the fields of its /proc/<pid>/stat after the command name (state,
    parent, group, ...): what the kernel says, not what we hope."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue


def group_members(pgid: int) -> list[int]:
    """The processes running in process group `pgid` (from /proc)."""
    return [pid for pid, fields in _processes() if int(fields[2]) == pgid and fields[0] != "Z"]


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    return [child for child, fields in _processes() if int(fields[1]) == pid]


async def read_pids(path: Path, timeout: float = 30.0) -> list[int]:
    """The pids a test's program wrote to `path` (written whole, renamed into place), once there."""
    text = await poll_until(
        lambda: asyncio.to_thread(lambda: path.read_text() if path.exists() else ""),
        bool,
        timeout_s=timeout,
        interval_s=0.05,
        what=f"{path} written",
    )
    return [int(pid) for pid in text.split()]


async def gone_within(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` s for processes `pids` to end; those still running then (each killed,
    so that a failed test leaves none behind)."""

    async def left() -> list[int]:
        return [pid for pid in pids if running(pid)]

    with contextlib.suppress(DeadlinePassed):
        await poll_until(left, lambda alive: not alive, timeout_s=timeout, interval_s=0.05)
    survivors = await left()
    for pid in survivors:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return survivors


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


# A spear process needs seconds to start on a loaded machine (the interpreter and its imports:
# more than 10 s was seen with 2 cores shared by several test runs): waits for one allow this.
PROCESS_START_S = 30.0


async def until_responders(nc, service_name: str, count: int, timeout: float = PROCESS_START_S) -> None:
    """Until `count` instances of a NATS micro service answer (processes that were just started)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (found := await count_responders(nc, service_name, 0.1)) < count:
        if loop.time() > end:
            raise AssertionError(f"{found} of {count} {service_name} answer after {timeout} s")
    assert await count_responders(nc, service_name) == count, service_name  # and no more


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
