"""Exporting spear's telemetry as `[telemetry]` says: OTLP for traces and metrics, a JSON lines
file for traces; without either, spans are made unsampled (nothing recorded)."""

from __future__ import annotations

import os
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from spear.core.config import TelemetrySettings
from spear.telemetry import metrics, tracing


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
    provider = tracer_provider(settings, attributes)
    if provider is None:
        return lambda: metrics.instruments().provider.shutdown()
    tracing.use_provider(provider)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)

    def shutdown() -> None:
        provider.shutdown()
        metrics.instruments().provider.shutdown()

    return shutdown


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
