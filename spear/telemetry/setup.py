"""Exporting spear's telemetry as `[telemetry]` says: OTLP for traces and metrics, a JSON lines
file for traces; without either, spans are made unsampled (nothing recorded)."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from spear.core.config import TelemetrySettings
from spear.telemetry import metrics, tracing

log = logging.getLogger(__name__)


def setup(settings: TelemetrySettings, component: str) -> Callable[[], None]:
    """Export traces (and metrics, over OTLP) as configured; returns what flushes them at exit.

    With an exporter, spear's tracer provider also becomes the global one if the process has
    none, so spans a function makes with the OpenTelemetry API join its invocation's trace."""
    attributes = {"service.name": settings.service_name, "service.component": component}
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = OTLPMetricExporter(endpoint=_otlp(settings.otlp_endpoint, "metrics"))
        metrics.add_reader(
            PeriodicExportingMetricReader(exporter, export_interval_millis=settings.metrics_export_interval_ms),
            attributes,
        )
        # The reader exports on a timer from now on: its provider made now, not at the first use
        # of an instrument (probe54: a worker uses none until late or never, and its reader said
        # "Cannot call collect on a MetricReader until it is registered" every interval).
        metrics.instruments()
    provider = tracer_provider(settings, attributes)
    if provider is not None:
        tracing.use_provider(provider)
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(provider)

    def shutdown() -> None:
        if provider is not None:
            provider.shutdown()
        metrics.instruments().provider.shutdown()

    return functools.partial(_within, SHUTDOWN_S, shutdown)


SHUTDOWN_S = 3.0  # the most a stop waits for telemetry's last exports


def _within(seconds: float, shutdown: Callable[[], None]) -> None:
    """Run `shutdown` for at most `seconds`: exporters retry an unreachable collector with backoff
    (probe54: a stop took 20-30 s with its OTLP endpoint down); what is not sent by then is lost."""
    done = threading.Thread(target=shutdown, name="spear-telemetry-shutdown", daemon=True)
    done.start()
    done.join(seconds)
    if done.is_alive():
        log.warning("telemetry: its last exports did not end within %g s: the stop goes on without them", seconds)


def tracer_provider(settings: TelemetrySettings, attributes: dict[str, str]) -> TracerProvider | None:
    """A provider exporting as configured, or None when no exporter is (tracing stays off)."""
    if not (settings.otlp_endpoint or settings.traces_file):
        return None
    provider = tracing.provider(ParentBased(TraceIdRatioBased(settings.sampling_ratio)), attributes)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=_otlp(settings.otlp_endpoint, "traces"))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if settings.traces_file:
        path = settings.traces_file.replace("{pid}", str(os.getpid()))  # one file per process if asked
        provider.add_span_processor(SimpleSpanProcessor(tracing.JsonLinesExporter(path)))
    return provider


def _otlp(endpoint: str, signal: str) -> str:
    """The OTLP/HTTP URL of a signal under the collector's base URL."""
    return f"{endpoint.rstrip('/')}/v1/{signal}"
