"""Export as `[telemetry]` says: spans over OTLP/HTTP to a collector (here a small HTTP server
that records what it receives), and as JSON lines to a file; without either, tracing is off."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from opentelemetry.trace import SpanKind

from spear.core.config import TelemetrySettings
from spear.telemetry import tracing
from spear.telemetry.setup import tracer_provider
from tests.processes import free_port


async def test_spans_go_over_otlp_http_to_the_configured_endpoint():
    received: list[tuple[str, str, int]] = []

    async def collect(request: web.Request) -> web.Response:
        received.append((request.path, request.content_type, len(await request.read())))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        settings = TelemetrySettings(otlp_endpoint=f"http://127.0.0.1:{port}")
        provider = tracer_provider(settings, {"service.name": "spear-test"})
        assert provider is not None
        previous = tracing.use_provider(provider)
        try:
            with tracing.span("process spear.api.invoke_function", SpanKind.CONSUMER):
                pass
        finally:
            tracing.use_provider(previous)
        # The batch exporter sends from its own thread; flushing waits for it, off the event loop.
        assert await asyncio.to_thread(provider.force_flush, 10_000)
        provider.shutdown()
    finally:
        await runner.cleanup()
    assert received and received[0][0] == "/v1/traces" and received[0][1] == "application/x-protobuf"
    assert received[0][2] > 0


def test_spans_as_json_lines_and_off_without_an_exporter(tmp_path):
    assert tracer_provider(TelemetrySettings(), {}) is None
    path = tmp_path / "spans-{pid}.jsonl"
    provider = tracer_provider(TelemetrySettings(traces_file=str(path)), {"service.name": "spear-test"})
    assert provider is not None
    previous = tracing.use_provider(provider)
    try:
        with tracing.span("send x", SpanKind.PRODUCER, attributes={"messaging.system": "nats"}):
            pass
    finally:
        tracing.use_provider(previous)
        provider.shutdown()
    (written,) = tmp_path.glob("spans-*.jsonl")
    span = json.loads(written.read_text().splitlines()[0])
    assert span["name"] == "send x" and span["kind"] == "SpanKind.PRODUCER"
    assert span["attributes"]["messaging.system"] == "nats"


def test_tracing_off_still_gives_each_span_its_own_id_under_the_callers_trace():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    previous = tracing.use_provider(TracerProvider(sampler=ALWAYS_OFF))
    try:
        caller = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        with tracing.consumer("spear.api.invoke_function", caller, {}) as outer:
            assert not outer.is_recording()
            with tracing.producer("spear.append.demo.x.requested", "t", {}, None):
                carried = tracing.inject({})["traceparent"]
        _, trace_id, span_id, flags = carried.split("-")
        assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and span_id not in ("00f067aa0ba902b7", "0" * 16)
        assert flags == "01"  # the caller's choice is passed on, for components that do record
        with tracing.span("root", SpanKind.INTERNAL):
            fresh = tracing.inject({})["traceparent"].split("-")[1]
        assert fresh != trace_id and fresh != "0" * 32
        assert tracing.current_ids() == ("", "")  # the contexts were detached
    finally:
        tracing.use_provider(previous)


@pytest.mark.slow
async def test_a_worker_process_serves_its_metrics_and_pushes_otlp(settings, client, tmp_path):
    """`spear worker` apart: /metrics on `[telemetry] metrics_port`, and traces and metrics pushed
    to the configured OTLP endpoint (a small HTTP server here)."""
    from contextlib import AsyncExitStack

    import aiohttp

    from spear.core.enums import ExecutionStatus
    from tests.conftest import invoke_body, start_spear
    from tests.processes import spawn, stop, wait_for_pullers

    received: set[str] = set()

    async def collect(request: web.Request) -> web.Response:
        await request.read()
        received.add(request.path)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    app.router.add_post("/v1/metrics", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    collector_port, metrics_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", collector_port).start()
    env = {
        "SPEAR_TELEMETRY__METRICS_PORT": str(metrics_port),
        "SPEAR_TELEMETRY__OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
        "SPEAR_TELEMETRY__METRICS_EXPORT_INTERVAL_MS": "300",
    }
    try:
        async with AsyncExitStack() as stack:
            running = await start_spear(stack, settings, with_worker=False)
            log_path = tmp_path / "worker.log"
            args = ("worker", "--nats-url", settings.nats.urls[0])
            worker = await spawn(*args, prefix=settings.subject_prefix, env=env, log_path=log_path)
            try:
                await wait_for_pullers(client, running.names.stream, running.names.worker_consumer("demo"), 1)
                data = json.dumps(invoke_body("echo", value=1)).encode()
                sampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
                subject = running.names.api("invoke_function")
                reply = json.loads((await client.request(subject, data, 10, headers=sampled)).data)
                assert reply["result"]["status"] == ExecutionStatus.COMPLETED
                # pushed with nobody scraping /metrics first (probe54: the reader's provider was
                # made at the first scrape; until then it warned every interval and pushed nothing)
                for _ in range(100):  # metrics every 300 ms; spans in the exporter's next batch
                    if received >= {"/v1/metrics"}:
                        break
                    await asyncio.sleep(0.05)
                assert "/v1/metrics" in received
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
                ):
                    assert response.status == 200
                    assert "spear_process_memory_usage_bytes" in await response.text()
            finally:
                assert await stop(worker) == 0  # the exit flushes what is left
    finally:
        await runner.cleanup()
    assert received == {"/v1/metrics", "/v1/traces"}
    assert "MetricReader" not in log_path.read_text(), log_path.read_text()[-2000:]


@pytest.mark.slow
async def test_a_stop_does_not_wait_long_for_a_collector_that_is_down(settings, client, tmp_path):
    """probe54: with its OTLP endpoint unreachable, a stop took 20-30 s (the exporters' retries)."""
    import time
    from contextlib import AsyncExitStack

    from tests.conftest import invoke_body, start_spear
    from tests.processes import spawn, stop, wait_for_pullers

    env = {
        "SPEAR_TELEMETRY__OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "SPEAR_TELEMETRY__METRICS_EXPORT_INTERVAL_MS": "300",
    }
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        log_path = tmp_path / "worker.log"
        args = ("worker", "--nats-url", settings.nats.urls[0])
        worker = await spawn(*args, prefix=settings.subject_prefix, env=env, log_path=log_path)
        await wait_for_pullers(client, running.names.stream, running.names.worker_consumer("demo"), 1)
        sampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        for _ in range(3):  # spans to export too
            data = json.dumps(invoke_body("echo", value=1)).encode()
            await client.request(running.names.api("invoke_function"), data, 10, headers=sampled)
        await asyncio.sleep(1.0)  # a few exports tried and failed
        began = time.monotonic()
        code = await stop(worker)
        took = time.monotonic() - began
    assert code == 0 and took < 8, (code, took, log_path.read_text()[-2000:])
