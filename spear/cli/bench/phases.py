"""The measurements of one run: raw NATS's floor, then spear's SYNC, ASYNC, status, HTTP and rebuild."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client as Nats

from spear.cli.bench.measure import (
    CpuMeter,
    check,
    check_http,
    p,
    progress,
    rate,
    sequential,
)
from spear.cli.bench.pipelined import PipelinedCalls
from spear.cli.bench.plan import ECHO, WINDOW, Plan
from spear.core.config import Settings
from spear.core.names import Names
from spear.interpreter import PYTHON
from spear.jetstream import rawsub, requests
from spear.orphans import die_with_parent

RESPONDER_START_S = 30.0  # the longest the echo responder may take to say it is ready


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
                await requests.request(self.nc, subject, b"x", timeout=5)

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
                ack = await requests.request(self.nc, f"{subject}.js.x", b"{}", timeout=5)
                if b'"seq"' not in ack.data:
                    raise RuntimeError(f"JetStream did not store the message: {ack.data[:300]!r}")

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
            check(await requests.request(self.nc, invoke, sync_body, timeout=10))

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
            check(await requests.request(self.nc, status, body, timeout=10))

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

        def on_terminal(subject: bytes, reply: bytes, data: bytes, header_block: bytes) -> None:
            execution_id = subject.rsplit(b".", 2)[1].decode()
            if execution_id in pending:
                pending.discard(execution_id)
            else:
                completed_early.add(execution_id)  # its terminal came before its reply
            last_end[0] = time.perf_counter()
            if expected[0] >= 0 and not pending and len(self.execution_ids) == expected[0]:
                done.set()

        subscriptions = [await rawsub.subscribe_raw(self.nc, s, on_terminal) for s in self.names.terminal_events()]
        await self.nc.flush()

        def accepted(execution_id: str) -> None:
            self.execution_ids.append(execution_id)
            if execution_id in completed_early:
                completed_early.discard(execution_id)
            else:
                pending.add(execution_id)

        progress(f"ASYNC accepted ({self.plan.async_calls} calls, {WINDOW} in flight) and completed end to end")
        began, cpu = time.perf_counter(), self.meter.snapshot()
        calls = PipelinedCalls(self.nc, invoke, body, self.plan.async_calls, self.plan.phase_s, accepted)
        accepted_per_s = await calls.run()
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
            "async_given_up": calls.given_up,  # refused for a full queue until the phase's time was up
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


@dataclass(frozen=True)
class ReplayNames(Names):
    """The bench's own projection: its own durable consumer and state bucket."""

    projection_consumer = "bench-replay"

    @property
    def state_bucket(self) -> str:
        """The replay's own state bucket, apart from the real one."""
        return f"{self.prefix.upper()}_BENCH_STATE"


async def _responder(url: str, subject: str) -> asyncio.subprocess.Process:
    """An echo responder in its own process (as a gateway is), until its stdin closes.
    RuntimeError, with what it wrote to stderr, if it does not start."""
    script = (
        "import asyncio,sys,nats\n"
        "async def main():\n"
        "    nc=await nats.connect(sys.argv[1],max_reconnect_attempts=1)\n"
        "    async def echo(m): await m.respond(m.data)\n"
        "    await nc.subscribe(sys.argv[2],cb=echo); await nc.flush(); print('ready',flush=True)\n"
        "    await asyncio.get_running_loop().run_in_executor(None,sys.stdin.read); await nc.close()\n"
        "try:\n    import uvloop; uvloop.run(main())\nexcept ImportError:\n    asyncio.run(main())\n"
    )
    # Its stderr goes to a file of its own, not a pipe: whoever reads a pipe waits for every
    # holder (CI saw a test that killed the bench wait for ever), and a file still says why the
    # responder did not start (review46: the bench showed nothing).
    with tempfile.TemporaryFile() as errors:
        process = await asyncio.create_subprocess_exec(
            *PYTHON,
            "-c",
            script,
            url,
            subject,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            # It ends with the bench however that ends (its stdin closing is not enough while its
            # connection is reconnecting to a NATS stopped with the bench's spear up).
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), RESPONDER_START_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            if process.returncode is None:
                process.kill()
            await process.wait()
            errors.seek(0)
            said = "\n".join(errors.read()[-4000:].decode(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"the raw NATS echo responder did not start: {said or 'it said nothing'}")
    return process
