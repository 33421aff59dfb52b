"""spear's metrics as OpenTelemetry instruments, exposed in Prometheus text at `GET /metrics`.

One MeterProvider per process with a Prometheus reader (it registers with prometheus_client's
default registry, which `prometheus_text` renders) and, when configured, an OTLP reader. The
global OpenTelemetry meter provider is left alone, so embedding applications keep theirs.

Who records what (observability/README.md has the full table): the adapters count requests, the
service counts status queries and SYNC calls in flight and reads queue depths from the worker
consumers; the projection, which sees every event once, derives the execution metrics (times,
outcomes, queue waits, memory), so any process running a projection exposes them.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000)
BYTES_BUCKETS = (0, 4096, 65_536, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30)
RECENT_OUTCOMES = 100  # the ratio gauges look at this many latest executions per function
RATE_WINDOW_S = 60.0  # the per-second gauges count over this window

_extra_readers: list[MetricReader] = []
_resource_attributes: dict[str, str] = {"service.name": "spear"}


class Recent:
    """Per label set: the outcomes of the latest executions, and when recent events happened.
    Feeds the ready-made ratio and per-second gauges (counters stay the source of truth)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the Prometheus reader may collect from another thread
        self._outcomes: dict[tuple[tuple[str, str], ...], deque[str]] = {}
        self._times: dict[tuple[tuple[str, str], ...], deque[float]] = {}
        self._born = time.monotonic()

    def outcome(self, labels: dict[str, str], status: str) -> None:
        """Remember an execution's final status under `labels`."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._outcomes.setdefault(key, deque(maxlen=RECENT_OUTCOMES)).append(status)

    def tick(self, labels: dict[str, str]) -> None:
        """Remember that something happened now under `labels` (and forget what left the window,
        so memory stays bounded when nobody collects the metrics)."""
        key = tuple(sorted(labels.items()))
        now = time.monotonic()
        with self._lock:
            times = self._times.setdefault(key, deque())
            times.append(now)
            while times[0] < now - RATE_WINDOW_S:
                times.popleft()

    def ratios(self, status: str) -> list[Observation]:
        """Per label set, the share of recent outcomes that are `status`."""
        with self._lock:
            return [
                Observation(sum(1 for s in outcomes if s == status) / len(outcomes), dict(key))
                for key, outcomes in self._outcomes.items()
                if outcomes
            ]

    def per_second(self) -> list[Observation]:
        """Per label set, the recent rate of ticks."""
        now = time.monotonic()
        window = min(RATE_WINDOW_S, max(1.0, now - self._born))
        with self._lock:
            observations = []
            for key, times in self._times.items():
                while times and times[0] < now - RATE_WINDOW_S:
                    times.popleft()
                observations.append(Observation(len(times) / window, dict(key)))
            return observations


class Tally:
    """Counts by label values, kept in a dict and read by an observable instrument when metrics
    are collected: a request costs a dict update, not an SDK measurement (several µs each)."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, key: tuple[str, ...], delta: int = 1) -> None:
        """Add `delta` under the label values `key` (in the order of `labels`)."""
        self.counts[key] = self.counts.get(key, 0) + delta

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """Every label set's count (a collection thread may read while the loop writes: the
        dict is copied in one step)."""
        return [
            Observation(count, dict(zip(self.labels, key, strict=True))) for key, count in list(self.counts.items())
        ]


class Rate:
    """Events per second over the last RATE_WINDOW_S, counted per whole second (cheap to tick)."""

    def __init__(self) -> None:
        self._born = time.monotonic()
        self._second = 0
        self._count = 0
        self._past: deque[tuple[int, int]] = deque()  # (second, count) of seconds gone by

    def tick(self) -> None:
        """Count one event now."""
        second = int(time.monotonic())
        if second != self._second:
            if self._count:
                self._past.append((self._second, self._count))
            self._second, self._count = second, 0
        self._count += 1

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """The rate now (unlabelled)."""
        now = time.monotonic()
        window = min(RATE_WINDOW_S, max(1.0, now - self._born))
        while self._past and self._past[0][0] < now - RATE_WINDOW_S:
            self._past.popleft()
        recent = self._count if self._second >= now - RATE_WINDOW_S else 0
        return [Observation((sum(count for _, count in list(self._past)) + recent) / window)]


class Instruments:
    """spear's OpenTelemetry instruments and the Prometheus reader behind /metrics."""

    def __init__(self, readers: Sequence[MetricReader] = ()) -> None:
        provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(), *readers], resource=Resource.create(_resource_attributes)
        )
        self.provider = provider
        meter = provider.get_meter("spear")
        self.finished_recent = Recent()
        self.queue_depths: dict[str, tuple[int, int]] = {}  # task id -> (num_pending, num_ack_pending)

        # requests (both adapters): counted in dicts, observed at collection
        self.requests = Tally(("operation", "transport", "code"))
        meter.create_observable_counter(
            "spear_requests",
            callbacks=[self.requests.observe],
            description="API requests by operation, transport and result code",
        )
        self.durations: dict[tuple[str, str], dict[str, str]] = {}  # the histogram's attributes, made once
        self.request_duration = meter.create_histogram(
            "spear_request_duration",
            unit="ms",
            description="API request handling time (a SYNC invoke includes the execution)",
            explicit_bucket_boundaries_advisory=MS_BUCKETS,
        )
        self.concurrent_requests = Tally(("task_id", "function_name"))
        meter.create_observable_up_down_counter(
            "spear_concurrent_requests",
            callbacks=[self.concurrent_requests.observe],
            description="SYNC invocations this gateway is waiting on now",
        )
        self.status_queries = Tally(("found",))
        meter.create_observable_counter(
            "spear_status_queries",
            callbacks=[self.status_queries.observe],
            description="GetExecutionStatus queries answered",
        )
        self.status_rate = Rate()
        _gauge(meter, "spear_status_query_frequency", "1/s", "Status queries per second, last minute", self._statuses)

        # executions (the projection, from events)
        # (counted in dicts and observed at collection, as the requests are: the projection counts
        # every execution, and an SDK measurement costs tens of µs there)
        self.executions_finished = Tally(("task_id", "function_name", "status"))
        meter.create_observable_counter(
            "spear_executions_finished",
            callbacks=[self.executions_finished.observe],
            description="Executions that reached a terminal status, by status",
        )
        self.attempts_finished = Tally(("task_id", "function_name", "status"))
        meter.create_observable_counter(
            "spear_attempts_finished",
            callbacks=[self.attempts_finished.observe],
            description="Attempts that ended, by status (a retried attempt counts here, not in executions)",
        )
        self.execution_time = meter.create_histogram(
            "spear_execution_time",
            unit="ms",
            description="Function execution time of the final attempt of finished executions",
            explicit_bucket_boundaries_advisory=MS_BUCKETS,
        )
        self.wait_time = meter.create_histogram(
            "spear_average_wait_time",
            unit="ms",
            description="Queue wait of first attempts: started minus requested (average = sum / count)",
            explicit_bucket_boundaries_advisory=MS_BUCKETS,
        )
        self.memory_usage = meter.create_histogram(
            "spear_memory_usage",
            unit="By",
            description="memory_used_bytes of finished executions (growth of the worker's peak RSS)",
            explicit_bucket_boundaries_advisory=BYTES_BUCKETS,
        )
        _gauge(meter, "spear_success_rate", "1", "Share COMPLETED of the latest 100 executions", self._success)
        _gauge(meter, "spear_timeout_rate", "1", "Share TIMEOUT of the latest 100 executions", self._timeouts)
        _gauge(meter, "spear_completion_rate", "1/s", "Executions finished per second, last minute", self._done)

        # the projection: events it folded, and how far behind the log it is (its consumer's count)
        self.projection_events = Tally(())
        meter.create_observable_counter(
            "spear_projection_events",
            callbacks=[self.projection_events.observe],
            description="Events the projection folded into execution states",
        )
        self.projection_lag: int | None = None
        _gauge(meter, "spear_projection_lag", "", "Events stored and not yet folded by a projection", self._lag)

        # queues (read from the worker consumers) and the process
        _gauge(meter, "spear_queue_length", "", "Invocations stored and not yet taken by a worker", self._queue)
        _gauge(meter, "spear_pending_executions", "", "Invocations not finished: queued plus held", self._pending)
        _gauge(meter, "spear_process_memory_usage", "By", "Resident memory of this process", _process_memory)

    def _success(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.finished_recent.ratios("EXECUTION_STATUS_COMPLETED")

    def _timeouts(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.finished_recent.ratios("EXECUTION_STATUS_TIMEOUT")

    def _done(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.finished_recent.per_second()

    def _statuses(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.status_rate.observe(options)

    def _queue(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(pending, {"task_id": task}) for task, (pending, _) in list(self.queue_depths.items())]

    def _lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.projection_lag is None else [Observation(self.projection_lag)]

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(p + held, {"task_id": task}) for task, (p, held) in list(self.queue_depths.items())]


def _gauge(
    meter: Any, name: str, unit: str, description: str, callback: Callable[[CallbackOptions], Iterable[Observation]]
) -> None:
    meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


def _process_memory(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(process_rss_bytes())]


def process_rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the peak (ru_maxrss, KiB on Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_reader(reader: MetricReader, attributes: dict[str, str]) -> None:
    """Before the first instrument is used: export through `reader` too (OTLP), under `attributes`."""
    if instruments.cache_info().currsize:
        raise RuntimeError("metric readers must be added before spear's instruments are first used")
    _extra_readers.append(reader)
    _resource_attributes.update(attributes)


@lru_cache(maxsize=1)
def instruments() -> Instruments:
    """The process's instruments (made on first use)."""
    return Instruments(_extra_readers)


# --- recording ------------------------------------------------------------------------------------


def record_request(operation: str, transport: str, code: str, seconds: float) -> None:
    """Count a request and its duration by operation, transport and code."""
    meters = instruments()
    meters.requests.add((operation, transport, code or "OK"))
    attributes = meters.durations.get((operation, transport))
    if attributes is None:
        attributes = meters.durations[(operation, transport)] = {"operation": operation, "transport": transport}
    meters.request_duration.record(seconds * 1000, attributes)


def sync_call(task_id: str, function_name: str, delta: int) -> None:
    """A SYNC call starts (+1) or ends (-1)."""
    instruments().concurrent_requests.add((task_id, function_name), delta)


def record_status_query(found: bool) -> None:
    """Count a status query, found or not."""
    meters = instruments()
    meters.status_queries.add(("true" if found else "false",))
    meters.status_rate.tick()


def record_queue_depth(task_id: str, num_pending: int, num_ack_pending: int) -> None:
    """A task's invocations waiting for and held by workers."""
    instruments().queue_depths[task_id] = (num_pending, num_ack_pending)


def record_projection_lag(events: int) -> None:
    """Events stored but not yet folded by the projection."""
    instruments().projection_lag = events


def record_projected(events: int) -> None:
    """Count events the projection folded."""
    instruments().projection_events.add((), events)


def record_wait(task_id: str, function_name: str, wait_ms: float) -> None:
    """How long an invocation waited for a worker."""
    instruments().wait_time.record(max(0.0, wait_ms), {"task_id": task_id, "function_name": function_name})


def record_attempt(task_id: str, function_name: str, status: str) -> None:
    """Count an attempt that ended, by status."""
    instruments().attempts_finished.add((task_id, function_name, status))


def record_finished(task_id: str, function_name: str, status: str, execution_time_ms: int, memory_bytes: int) -> None:
    """Count a finished execution, with its time and memory."""
    meters = instruments()
    function = {"task_id": task_id, "function_name": function_name}
    meters.executions_finished.add((task_id, function_name, status))
    meters.execution_time.record(execution_time_ms, {**function, "status": status})
    meters.memory_usage.record(memory_bytes, function)
    meters.finished_recent.outcome(function, status)
    meters.finished_recent.tick(function)


def merge_exposition(own: bytes, other: bytes) -> bytes:
    """`own` Prometheus text plus the metric families of `other` that `own` does not have (the
    families both have, e.g. process memory, are this process's)."""
    have = {line.split()[2] for line in own.splitlines() if line.startswith(b"# HELP ")}
    kept: list[bytes] = []
    keep = False
    for line in other.splitlines(keepends=True):
        if line.startswith(b"# HELP "):
            keep = line.split()[2] not in have
        if keep:
            kept.append(line)
    return own + b"".join(kept)


def prometheus_text() -> tuple[bytes, str]:
    """The Prometheus exposition and its content type."""
    instruments()  # so the exposition lists spear's metrics even before the first request
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
