"""Export as `[telemetry]` says: spans over OTLP/HTTP to a collector (here a small HTTP server
that records what it receives), and as JSON lines to a file; without either, tracing is off."""

from __future__ import annotations

import asyncio
import json

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
        assert flags == "00"  # nothing was recorded here: downstream need not record either
        with tracing.span("root", SpanKind.INTERNAL):
            fresh = tracing.inject({})["traceparent"].split("-")[1]
        assert fresh != trace_id and fresh != "0" * 32
        assert tracing.current_ids() == ("", "")  # the contexts were detached
    finally:
        tracing.use_provider(previous)
