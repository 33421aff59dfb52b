"""What tracing costs: SYNC calls through the NATS gateway with tracing off (spear's default:
unsampled spans, nothing recorded) and on (every span recorded and handed to a batch exporter),
in one process against an embedded nats-server. Prints p50/p95/mean per mode.

    python observability/measure_tracing.py [calls]     # default 3000 calls per mode

The modes alternate in slices of 250 calls, so load from elsewhere on the machine falls on both
alike. The cost of one span alone (made, made current, ended) is measured apart, without I/O.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack

import nats
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import SpanKind

from spear.cli import components
from spear.core.config import load_settings, with_overrides
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream.connection import connect
from spear.jetstream.embedded import EmbeddedNats
from spear.telemetry import tracing

SLICE = 250
BODY = b'{"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": 1}]}'


class Discard(SpanExporter):
    """Receives every span (the SDK serialises nothing until an exporter does) and drops it."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Count `spans` and drop them."""
        self.count += len(spans)
        return SpanExportResult.SUCCESS


async def calls(client: nats.NATS, subject: str, count: int) -> list[float]:
    """`count` requests on `subject`, one after the other; each one's time in ms."""
    times = []
    for _ in range(count):
        began = time.perf_counter()
        await client.request(subject, BODY, timeout=10)
        times.append((time.perf_counter() - began) * 1000)
    return times


def span_cost_us(count: int = 20_000) -> float:
    """One span as spear makes them: started as current with attributes, ended."""
    attributes = {"messaging.system": "nats", "messaging.destination.name": "spear.api.invoke_function"}
    began = time.perf_counter()
    for _ in range(count):
        with tracing.span("process spear.api.invoke_function", SpanKind.CONSUMER, None, attributes):
            pass
    return (time.perf_counter() - began) / count * 1e6


def report(label: str, times: list[float]) -> None:
    """Print the median, 95th percentile and mean of `times`."""
    times = sorted(times)
    p95 = times[int(len(times) * 0.95)]
    print(f"{label:12s} p50 {statistics.median(times):.3f} ms  p95 {p95:.3f} ms  mean {statistics.fmean(times):.3f} ms")


async def main(count: int) -> None:
    """Measure SYNC calls without and with tracing, and the cost of one span."""
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedNats(data, port=-1)
        url = server.start()
        try:
            settings = with_overrides(load_settings(), nats={"urls": [url]}, subject_prefix="bench")
            async with AsyncExitStack() as stack:
                nc = await connect(settings, "bench")
                stack.push_async_callback(nc.close)
                await components.start_worker(stack, nc, settings, [demo])
                await components.start_projection(stack, nc, settings)
                service = await components.start_service(stack, nc, settings)
                await components.start_gateway(stack, service)
                for _ in range(200):  # until the gateway has seen the worker's task
                    if service.tasks.get("demo") is not None:
                        break
                    await asyncio.sleep(0.05)
                client = await nats.connect(url)
                stack.push_async_callback(client.close)
                subject = Names("bench").api("invoke_function")
                await calls(client, subject, 300)  # warm-up
                exporter = Discard()
                on = TracerProvider(sampler=ALWAYS_ON)
                on.add_span_processor(BatchSpanProcessor(exporter))
                off = TracerProvider(sampler=ALWAYS_OFF)
                times: dict[str, list[float]] = {"off": [], "on": []}
                for _ in range(max(1, count // SLICE)):
                    for label, provider in (("off", off), ("on", on)):
                        tracing.use_provider(provider)
                        times[label] += await calls(client, subject, SLICE)
                for label, measured in times.items():
                    report(f"SYNC, {label}", measured)
                on.force_flush()
                print(f"spans exported while on: {exporter.count} ({exporter.count / len(times['on']):.1f} a call)")
                for label, provider in (("off", off), ("on", on)):
                    tracing.use_provider(provider)
                    print(f"one span, {label}: {span_cost_us():.1f} µs")
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
