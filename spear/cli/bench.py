"""`spear bench`: spear's figures and raw NATS's, measured in one run, black-box over the contract.

Against a `spear up` it starts itself (a temporary data dir, any free ports), or against the spear
at `--nats-url` (and `--http-url`). Every phase is bounded in count and in time; progress goes to
stderr, the result to stdout (a table, or one JSON object with `--json`). The raw NATS figures
(a core request-reply round trip, an acked JetStream publish) are the floor spear's figures are
compared with: `ratios` says how many round trips a SYNC call costs, and what share of NATS's own
rates spear reaches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import nats
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from spear.cli.output import table
from spear.core.config import Settings
from spear.core.names import Names

WINDOW = 64  # requests in flight in the throughput phases
ECHO = {"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": 1}]}


@dataclass(frozen=True)
class Plan:
    """How much each phase does at most: `calls` operations, `phase_s` seconds."""

    sync_calls: int
    async_calls: int
    status_calls: int
    raw_calls: int
    phase_s: float


FULL = Plan(sync_calls=2000, async_calls=20_000, status_calls=20_000, raw_calls=2000, phase_s=15.0)
QUICK = Plan(sync_calls=200, async_calls=2000, status_calls=2000, raw_calls=300, phase_s=4.0)

# The targets of issue 11 (figure -> (target, "min" or "max")); the regression guard divides them by 10.
TARGETS: dict[str, tuple[float, str]] = {
    "sync_nats_p50_ms": (1.0, "max"),
    "sync_nats_p99_ms": (3.0, "max"),
    "async_accepted_per_s": (15_000, "min"),
    "async_completed_per_s": (5_000, "min"),
    "status_nats_per_s": (10_000, "min"),
    "status_http_per_s": (3_000, "min"),
    "rebuild_events_per_s": (50_000, "min"),
    "healthy_s": (2.0, "max"),
}


def add_parser(commands: Any) -> None:
    """Add `spear bench` and its options to the command parsers."""
    bench = commands.add_parser(
        "bench",
        help="measure spear (SYNC latency, ASYNC and status rates, rebuild) against raw NATS",
        description="Starts a `spear up` of its own unless --nats-url is given. Progress on stderr.",
    )
    bench.add_argument("--nats-url", help="bench the spear at this NATS instead of starting one")
    bench.add_argument("--http-url", help="its HTTP API (with --nats-url; without it the HTTP figures are skipped)")
    # Issue 11's figures are those of `spear up --workers 2`: one worker per core of its machine.
    bench.add_argument("--workers", type=int, default=2, help="worker processes of the spear up it starts (2)")
    bench.add_argument("--quick", action="store_true", help="a short run (a few seconds per phase)")
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")


def command(settings: Settings, args: argparse.Namespace) -> Coroutine[Any, Any, int] | None:
    """The coroutine that runs `spear bench`, or None for another command."""
    if args.command != "bench":
        return None
    return run_bench(settings, args)


def free_port() -> int:
    """A TCP port free on the loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _appending(path: Path) -> BinaryIO:
    return open(path, "ab")  # a local file: opening it does not block the loop noticeably


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """`spear bench`: measure raw NATS and spear, print the figures; the exit code."""
    plan = QUICK if args.quick else FULL
    figures: dict[str, Any] = {"plan": asdict(plan), "window": WINDOW}
    async with contextlib.AsyncExitStack() as stack:
        meter = CpuMeter(None)
        if args.nats_url:
            nats_url, http_url = args.nats_url.split(",")[0], args.http_url
        else:
            nats_url, http_url, healthy_s, pid = await _own_spear(stack, args)
            figures["healthy_s"] = round(healthy_s, 3)
            meter = CpuMeter(pid)
        nc = await nats.connect(nats_url, name="spear-bench", max_reconnect_attempts=1)
        stack.push_async_callback(nc.close)
        bench = Bench(nc, nats_url, settings, http_url, plan, meter)
        figures["raw"] = await bench.raw_nats()
        figures.update(await bench.spear())
    figures["ratios"] = ratios(figures)
    figures["targets"] = {
        name: {"target": t, "met": met(figures.get(name), t, way)} for name, (t, way) in TARGETS.items()
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(render(figures))
    return 0


async def _own_spear(stack: contextlib.AsyncExitStack, args: argparse.Namespace) -> tuple[str, str, float, int]:
    """Start `spear up` (temporary data dir, free ports); return its URLs and its time to healthy."""
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spear-bench-")))
    http_port = free_port()
    argv = [sys.executable, "-m", "spear", *(["--config", args.config] if args.config else [])]
    argv += ["up", "--data-dir", str(data_dir), "--nats-port", "-1", "--http-port", str(http_port)]
    argv += ["--workers", str(args.workers)]
    progress(f"starting {' '.join(argv[3:])} (its log: {data_dir / 'up.log'})")
    began = time.perf_counter()
    with _appending(data_dir / "up.log") as log_file:  # the child keeps its own descriptor
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=log_file)

    async def stop() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()

    stack.push_async_callback(stop)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    healthy_s = time.perf_counter() - began
    match = re.search(r"NATS (nats://\S+), HTTP (http://\S+) ", line)
    if not match:
        tail = (data_dir / "up.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"spear up did not start (exit {process.returncode}): {line!r}\n{tail}")
    progress(f"healthy after {healthy_s:.2f} s")
    return match.group(1), match.group(2), healthy_s, process.pid


class Bench:
    """The measurements of one bench run against one NATS (and HTTP API, if given)."""

    def __init__(
        self, nc: Nats, nats_url: str, settings: Settings, http_url: str | None, plan: Plan, meter: CpuMeter
    ) -> None:
        self.meter = meter
        self.nc, self.nats_url, self.settings, self.http_url, self.plan = nc, nats_url, settings, http_url, plan
        self.names = Names(settings.subject_prefix)
        self.execution_ids: list[str] = []

    # --- raw NATS: the floor ------------------------------------------------------------------

    async def raw_nats(self) -> dict[str, Any]:
        """Request-reply over plain NATS, the floor spear is compared with."""
        subject = f"bench.{secrets.token_hex(4)}"
        responder = await _responder(self.nats_url, subject)
        try:
            progress("raw NATS request-reply")

            async def ping() -> None:
                await self.nc.request(subject, b"x", timeout=5)

            latencies = await sequential(self.plan.raw_calls, self.plan.phase_s, ping)
            request_per_s = await rate(self.plan.raw_calls * 5, self.plan.phase_s, ping)
        finally:
            assert responder.stdin is not None
            responder.stdin.close()
            await responder.wait()
        progress("raw NATS acked JetStream publish")
        js = self.nc.jetstream()
        stream = f"BENCH_{secrets.token_hex(4).upper()}"
        await js.add_stream(name=stream, subjects=[f"{subject}.js.>"])
        try:

            async def publish() -> None:
                await js.publish(f"{subject}.js.x", b"{}", timeout=5)

            publish_latencies = await sequential(self.plan.raw_calls, self.plan.phase_s, publish)
            publish_per_s = await rate(self.plan.raw_calls * 5, self.plan.phase_s, publish)
        finally:
            await js.delete_stream(stream)
        return {
            "request_reply_p50_ms": p(latencies, 50),
            "request_reply_p99_ms": p(latencies, 99),
            "request_reply_per_s": request_per_s,
            "publish_p50_ms": p(publish_latencies, 50),
            "publish_per_s": publish_per_s,
        }

    # --- spear ------------------------------------------------------------------------------------

    async def spear(self) -> dict[str, Any]:
        """spear's SYNC latency, ASYNC and status rates and the rest of the plan."""
        figures: dict[str, Any] = {}
        invoke = self.names.api("invoke_function")
        sync_body = msgspec.json.encode({**ECHO, "execution_mode": "SYNC"})
        async_body = msgspec.json.encode({**ECHO, "execution_mode": "ASYNC"})

        async def sync_call() -> None:
            check(await self.nc.request(invoke, sync_body, timeout=10))

        await sequential(20, self.plan.phase_s, sync_call)  # warm up: connections, caches, first imports
        progress(f"SYNC over NATS ({self.plan.sync_calls} calls, one at a time)")
        cpu = self.meter.snapshot()
        latencies = await sequential(self.plan.sync_calls, self.plan.phase_s, sync_call)
        figures["cpu_ms_per_sync_call"] = self.meter.per_operation(cpu, len(latencies))
        figures["sync_nats_p50_ms"], figures["sync_nats_p99_ms"] = p(latencies, 50), p(latencies, 99)
        figures["sync_nats_calls"] = len(latencies)

        figures.update(await self._async_phase(invoke, async_body))

        status = self.names.api("get_execution_status")
        ids = self.execution_ids or ["0" * 26]
        cursor = iter(range(10**9))

        async def status_call() -> None:
            body = b'{"execution_id":"%s"}' % ids[next(cursor) % len(ids)].encode()
            check(await self.nc.request(status, body, timeout=10))

        progress(f"status over NATS ({self.plan.status_calls} queries, {WINDOW} in flight)")
        cpu, calls = self.meter.snapshot(), [0]

        async def counted_status_call() -> None:
            calls[0] += 1
            await status_call()

        figures["status_nats_per_s"] = await rate(self.plan.status_calls, self.plan.phase_s, counted_status_call)
        figures["cpu_ms_per_status_query"] = self.meter.per_operation(cpu, calls[0])
        if self.http_url:
            figures.update(await self._http(sync_body, ids))
        figures.update(await self._rebuild())
        return figures

    async def _async_phase(self, invoke: str, body: bytes) -> dict[str, Any]:
        """ASYNC invocations, WINDOW in flight: accepted/s while they are sent; completed/s from
        the first send to the last terminal event stored (counted from the stored events)."""
        pending: set[str] = set()
        completed_early: set[str] = set()
        done = asyncio.Event()
        last_end = [0.0]
        expected = [-1]

        async def on_terminal(msg: Msg) -> None:
            execution_id = Names.event_execution_id(msg.subject)
            if execution_id in pending:
                pending.discard(execution_id)
            else:
                completed_early.add(execution_id)  # its terminal came before its reply
            last_end[0] = time.perf_counter()
            if expected[0] >= 0 and not pending and len(self.execution_ids) == expected[0]:
                done.set()

        subscriptions = [await self.nc.subscribe(s, cb=on_terminal) for s in self.names.terminal_events()]
        await self.nc.flush()

        async def async_call() -> None:
            msg = await self.nc.request(invoke, body, timeout=10)
            while (wait_s := backpressure_s(msg)) is not None:  # the queue is full: back off, as a client would
                await asyncio.sleep(wait_s)
                msg = await self.nc.request(invoke, body, timeout=10)
            reply = check(msg)
            execution_id = str(reply["execution_id"])
            self.execution_ids.append(execution_id)
            if execution_id in completed_early:
                completed_early.discard(execution_id)
            else:
                pending.add(execution_id)

        progress(f"ASYNC accepted ({self.plan.async_calls} calls, {WINDOW} in flight) and completed end to end")
        began, cpu = time.perf_counter(), self.meter.snapshot()
        accepted_per_s = await rate(self.plan.async_calls, self.plan.phase_s, async_call)
        expected[0] = len(self.execution_ids)
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.plan.phase_s * 2)
        for subscription in subscriptions:
            await subscription.unsubscribe()
        finished = len(self.execution_ids) - len(pending)
        cpu_per_execution = self.meter.per_operation(cpu, finished)
        elapsed = max(last_end[0] - began, 1e-9)
        return {
            "async_accepted_per_s": accepted_per_s,
            "async_completed_per_s": round(finished / elapsed),
            "async_calls": len(self.execution_ids),
            "async_not_completed": len(pending),
            "cpu_ms_per_async_execution": cpu_per_execution,
        }

    async def _http(self, sync_body: bytes, ids: list[str]) -> dict[str, Any]:
        import aiohttp

        figures: dict[str, Any] = {}
        url = str(self.http_url).rstrip("/")
        headers = {"Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=WINDOW)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def sync_call() -> None:
                async with session.post(f"{url}/api/v1/invoke", data=sync_body, headers=headers) as response:
                    check_http(response.status, await response.read())

            await sequential(20, self.plan.phase_s, sync_call)
            progress(f"SYNC over HTTP ({self.plan.sync_calls} calls, one at a time)")
            latencies = await sequential(self.plan.sync_calls, self.plan.phase_s, sync_call)
            figures["sync_http_p50_ms"], figures["sync_http_p99_ms"] = p(latencies, 50), p(latencies, 99)
            cursor = iter(range(10**9))

            async def status_call() -> None:
                execution_id = ids[next(cursor) % len(ids)]
                async with session.get(f"{url}/api/v1/executions/{execution_id}") as response:
                    check_http(response.status, await response.read())

            progress(f"status over HTTP ({self.plan.status_calls} queries, {WINDOW} in flight)")
            figures["status_http_per_s"] = await rate(self.plan.status_calls, self.plan.phase_s, status_call)
        return figures

    async def _rebuild(self) -> dict[str, Any]:
        """Replay the stream through a projection of its own (its own consumer and state bucket,
        deleted afterwards), so the spear under test is not disturbed."""
        from spear.jetstream import topology
        from spear.projection.projection import Projection

        js = self.nc.jetstream()
        info = await js.stream_info(self.names.stream)
        events, last_seq = info.state.messages, info.state.last_seq
        names = ReplayNames(self.names.prefix)
        progress(f"projection rebuild ({events} events)")
        projection = Projection(self.nc, self.settings, names)
        try:
            # Its bucket is made before the clock starts: making a stream is not replaying one.
            await topology.ensure_base(self.nc, names, self.settings.nats.stream_replicas)
            began, cpu_began = time.perf_counter(), time.process_time()  # the replay runs in this process
            await projection.start()
            with contextlib.suppress(TimeoutError):
                await projection.wait(last_seq, timeout=self.plan.phase_s * 4)
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu_began
            applied = projection.applied_seq - (info.state.first_seq - 1)
        finally:
            await projection.stop()
            with contextlib.suppress(Exception):
                await js.delete_consumer(names.stream, names.projection_consumer)
            with contextlib.suppress(Exception):
                await js.delete_stream(f"KV_{names.state_bucket}")
        return {
            "rebuild_events": applied,
            "rebuild_events_per_s": round(min(applied, events) / elapsed),
            "rebuild_cpu_us_per_event": round(cpu / max(1, applied) * 1e6, 1),
        }


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


@dataclass(frozen=True)
class ReplayNames(Names):
    """The bench's own projection: its own durable consumer and state bucket."""

    projection_consumer = "bench-replay"

    @property
    def state_bucket(self) -> str:
        """The replay's own state bucket, apart from the real one."""
        return f"{self.prefix.upper()}_BENCH_STATE"


async def _responder(url: str, subject: str) -> asyncio.subprocess.Process:
    """An echo responder in its own process (as a gateway is), until its stdin closes."""
    script = (
        "import asyncio,sys,nats\n"
        "async def main():\n"
        "    nc=await nats.connect(sys.argv[1])\n"
        "    async def echo(m): await m.respond(m.data)\n"
        "    await nc.subscribe(sys.argv[2],cb=echo); await nc.flush(); print('ready',flush=True)\n"
        "    await asyncio.get_running_loop().run_in_executor(None,sys.stdin.read); await nc.close()\n"
        "try:\n    import uvloop; uvloop.run(main())\nexcept ImportError:\n    asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, url, subject, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    await asyncio.wait_for(process.stdout.readline(), 30)
    return process


# --- measuring --------------------------------------------------------------------------------------


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


# --- the result -------------------------------------------------------------------------------------


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    """spear against raw NATS: round trips per SYNC call, shares of NATS's own rates."""
    raw = figures["raw"]
    pairs = {
        "sync_nats_p50_in_round_trips": ("sync_nats_p50_ms", raw["request_reply_p50_ms"]),
        "sync_http_p50_in_round_trips": ("sync_http_p50_ms", raw["request_reply_p50_ms"]),
        "async_accepted_of_publish_rate": ("async_accepted_per_s", raw["publish_per_s"]),
        "async_completed_of_publish_rate": ("async_completed_per_s", raw["publish_per_s"]),
        "status_nats_of_request_rate": ("status_nats_per_s", raw["request_reply_per_s"]),
    }
    return {name: round(figures[key] / base, 3) for name, (key, base) in pairs.items() if key in figures and base}


def met(value: float | None, target: float, way: str) -> bool | None:
    """Whether `value` meets its target (`way`: max or min); None if not measured."""
    if value is None:
        return None
    return value <= target if way == "max" else value >= target


ROWS = [
    ("time from spear up to healthy", "healthy_s", "s"),
    ("SYNC over NATS p50", "sync_nats_p50_ms", "ms"),
    ("SYNC over NATS p99", "sync_nats_p99_ms", "ms"),
    ("SYNC over HTTP p50", "sync_http_p50_ms", "ms"),
    ("SYNC over HTTP p99", "sync_http_p99_ms", "ms"),
    ("ASYNC accepted", "async_accepted_per_s", "/s"),
    ("ASYNC completed end to end", "async_completed_per_s", "/s"),
    ("status over NATS", "status_nats_per_s", "/s"),
    ("status over HTTP", "status_http_per_s", "/s"),
    ("projection rebuild", "rebuild_events_per_s", "events/s"),
    ("rebuild CPU (replaying process)", "rebuild_cpu_us_per_event", "µs/event"),
]


def render(figures: dict[str, Any]) -> str:
    """The figures as a text table, each beside its target."""
    rows = []
    for label, key, unit in ROWS:
        if key in figures:
            target = TARGETS.get(key)
            goal = f"{'≤' if target[1] == 'max' else '≥'} {target[0]:g}" if target else ""
            mark = {True: "yes", False: "no", None: ""}[met(figures[key], *target) if target else None]
            rows.append((label, f"{figures[key]:g} {unit}", goal, mark))
    raw = figures["raw"]
    lines = [table(("figure", "spear", "target", "met"), rows), ""]
    lines.append(
        f"raw NATS: request-reply p50 {raw['request_reply_p50_ms']:g} ms, {raw['request_reply_per_s']} /s; "
        f"acked JetStream publish p50 {raw['publish_p50_ms']:g} ms, {raw['publish_per_s']} /s"
    )
    lines += [f"  {name}: {value:g}" for name, value in figures["ratios"].items()]
    for key in ("cpu_ms_per_sync_call", "cpu_ms_per_async_execution", "cpu_ms_per_status_query"):
        if figures.get(key):
            parts = ", ".join(f"{part} {ms:g} ms" for part, ms in figures[key].items())
            lines.append(f"CPU {key.removeprefix('cpu_ms_per_').replace('_', ' ')}: {parts}")
    if figures.get("async_not_completed"):
        lines.append(f"ASYNC executions not completed within the phase: {figures['async_not_completed']}")
    return "\n".join(lines)
