"""How a phase measures: CPU per operation from /proc, sequential and pipelined timing, checks."""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

from spear.cli.bench.plan import WINDOW


class CpuMeter:
    """CPU time used by the process tree of the spear up under test (Linux /proc): spear's Python
    processes apart from its nats-server. On a shared machine this is the steadier figure: rates
    fall when other work takes the cores, CPU per operation hardly moves."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """Per process of the tree now: its name and CPU seconds used so far."""
        seen: dict[int, tuple[str, float]] = {}
        todo = [self.root] if self.root else []
        while todo:
            pid = todo.pop()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                seen[pid] = (name, (int(fields[11]) + int(fields[12])) / self.tick)
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(child) for child in (task / "children").read_text().split()]
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not Linux
        return seen

    def per_operation(self, before: dict[int, tuple[str, float]], operations: int) -> dict[str, float]:
        """CPU ms per operation since `before`: {"spear": ..., "nats_server": ...} ({} if unknown)."""
        if not self.root or not operations:
            return {}
        used = {"spear": 0.0, "nats_server": 0.0}
        for pid, (name, seconds) in self.snapshot().items():
            part = "nats_server" if name.startswith("nats-server") else "spear"
            used[part] += seconds - before.get(pid, (name, 0.0))[1]
        return {part: round(seconds * 1000 / operations, 3) for part, seconds in used.items()}


async def sequential(count: int, limit_s: float, call: Callable[[], Awaitable[None]]) -> list[float]:
    """Latencies (ms) of up to `count` calls made one after another, for at most `limit_s`."""
    latencies: list[float] = []
    end = time.perf_counter() + limit_s
    for _ in range(count):
        began = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - began) * 1000)
        if began > end:
            break
    return latencies


async def rate(count: int, limit_s: float, call: Callable[[], Awaitable[None]]) -> int:
    """Calls per second with WINDOW in flight, over up to `count` calls or `limit_s` seconds."""
    made = [0]
    began = time.perf_counter()
    end = began + limit_s

    async def lane() -> None:
        while made[0] < count and time.perf_counter() < end:
            made[0] += 1
            await call()

    await asyncio.gather(*(lane() for _ in range(WINDOW)))
    return round(made[0] / (time.perf_counter() - began))


def backpressure_s(msg: Msg) -> float | None:
    """How long to back off if spear refused the call for capacity (RESOURCE_EXHAUSTED, with its
    Retry-After), else None: a pipelined bench can fill the ASYNC queue faster than workers drain it."""
    if not msg.headers or "Retry-After" not in msg.headers:
        return None
    try:
        return max(0.05, min(1.0, float(msg.headers["Retry-After"])))
    except ValueError:
        return 1.0


class Accepted(msgspec.Struct):
    """What the ASYNC phase reads of an InvokeFunction reply (the rest is skipped undecoded)."""

    success: bool = False
    execution_id: str | None = None
    error_code: str | None = None


_accepted = msgspec.json.Decoder(Accepted)
_RETRY_AFTER = re.compile(rb"\r\nRetry-After: *([^\r]*)\r\n")


def raw_backpressure_s(headers: bytes) -> float | None:
    """`backpressure_s` of a reply taken raw (its header block as received)."""
    found = _RETRY_AFTER.search(headers) if headers else None
    if found is None:
        return None
    try:
        return max(0.05, min(1.0, float(found.group(1))))
    except ValueError:
        return 1.0


def check_accepted(data: bytes) -> str:
    """The execution id of an accepted ASYNC call, or RuntimeError if spear answered with an error
    (the bench's client decodes no more than it needs: its CPU is taken from spear's two cores)."""
    try:
        reply = _accepted.decode(data)
    except msgspec.DecodeError:
        reply = Accepted()
    if not reply.success or not reply.execution_id:
        raise RuntimeError(f"spear replied with an error: {data[:300]!r}")
    return reply.execution_id


def check(msg: Msg) -> dict[str, Any]:
    """The decoded reply, or RuntimeError if spear answered with an error."""
    reply: dict[str, Any] = msgspec.json.decode(msg.data)
    if reply.get("success") is False or reply.get("found") is False:
        raise RuntimeError(f"spear replied with an error: {msg.data[:300]!r}")
    return reply


def check_http(status: int, body: bytes) -> None:
    """RuntimeError unless the HTTP status is a success."""
    if status >= 300:
        raise RuntimeError(f"spear's HTTP API answered {status}: {body[:300]!r}")


def p(latencies: list[float], percent: int) -> float:
    """The `percent`th percentile of `latencies`, rounded to microseconds."""
    if len(latencies) < 2:
        return round(latencies[0], 3) if latencies else 0.0
    return round(statistics.quantiles(latencies, n=100, method="inclusive")[percent - 1], 3)


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"bench: {text}", file=sys.stderr, flush=True)
