"""OpenTelemetry metrics for spear, exposed in Prometheus text format at `GET /metrics`.

One MeterProvider per process with a Prometheus reader (it registers with prometheus_client's
default registry, which `prometheus_text` renders). The global OpenTelemetry provider is left
alone, so embedding applications keep theirs.
"""

from __future__ import annotations

from functools import lru_cache

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


class Instruments:
    def __init__(self) -> None:
        provider = MeterProvider(
            metric_readers=[PrometheusMetricReader()], resource=Resource.create({"service.name": "spear"})
        )
        meter = provider.get_meter("spear")
        self.requests = meter.create_counter(
            "spear_requests", unit="1", description="API requests by operation, transport and result code"
        )
        self.request_duration = meter.create_histogram(
            "spear_request_duration", unit="ms", description="API request handling time"
        )
        self.executions_finished = meter.create_counter(
            "spear_executions_finished", unit="1", description="Executions that reached a terminal status"
        )
        self.execution_time = meter.create_histogram(
            "spear_execution_time", unit="ms", description="Function execution time of finished executions"
        )


@lru_cache(maxsize=1)
def instruments() -> Instruments:
    return Instruments()


def record_request(operation: str, transport: str, code: str, seconds: float) -> None:
    meters = instruments()
    meters.requests.add(1, {"operation": operation, "transport": transport, "code": code or "OK"})
    meters.request_duration.record(seconds * 1000, {"operation": operation, "transport": transport})


def record_finished(task_id: str, function_name: str, status: str, execution_time_ms: int) -> None:
    meters = instruments()
    labels = {"task_id": task_id, "function_name": function_name, "status": status}
    meters.executions_finished.add(1, labels)
    meters.execution_time.record(execution_time_ms, {"task_id": task_id, "function_name": function_name})


def prometheus_text() -> tuple[bytes, str]:
    instruments()  # so the exposition lists spear's metrics even before the first request
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
