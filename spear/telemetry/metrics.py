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

import dataclasses
import logging
import math
import resource
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, Protocol

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram as SdkHistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import DefaultAggregation, ExplicitBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

MS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000)
# API requests: a SYNC call of a quick function takes about a millisecond (the bench's targets are
# p50 1 ms, p99 3 ms), so the buckets split the first one (probe54: all of them fell in `le="1"`)
REQUEST_MS_BUCKETS = (0.25, 0.5, 0.75, *MS_BUCKETS)
BYTES_BUCKETS = (0, 4096, 65_536, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30)
RECENT_OUTCOMES = 100  # the ratio gauges look at this many latest executions per function
RATE_WINDOW_S = 60.0  # the per-second gauges count over this window
SCOPE = "spear"  # the instrumentation scope (meter name) of every instrument here
CARDINALITY_LIMIT = 2000  # the SDK's default: label sets past it share one overflow point
OVERFLOW_ATTRIBUTES: dict[str, Any] = {"otel.metric.overflow": True}  # the SDK's overflow point

log = logging.getLogger(__name__)

_extra_readers: list[MetricReader] = []
_answering_status_queries = False  # this process runs the service (`answer_status_queries`)
_resource_attributes: dict[str, str] = {"service.name": "spear"}


STARTED = time.monotonic()  # when this process imported spear's metrics: as it starts up


def _window_s(now: float) -> float:
    """What a per-second rate divides by: the last RATE_WINDOW_S, or the time since the process
    started when that is shorter (not since the first event, which made the first rate a spike)."""
    return min(RATE_WINDOW_S, max(1.0, now - STARTED))


class Recent:
    """Per label set: the outcomes of the latest executions, and when they ended. Feeds the
    ready-made ratio and per-second gauges (counters stay the source of truth)."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self._lock = threading.Lock()  # the Prometheus reader may collect from another thread
        self._outcomes: dict[tuple[str, ...], deque[str]] = {}
        self._times: dict[tuple[str, ...], deque[float]] = {}
        self._attributes: dict[tuple[str, ...], dict[str, str]] = {}  # by label name, made once

    def finished(self, key: tuple[str, ...], status: str) -> None:
        """Remember an execution's final status and that it ended now, under the label values
        `key` (and forget what left the window, so memory stays bounded when nobody collects)."""
        now = time.monotonic()
        with self._lock:
            outcomes = self._outcomes.get(key)
            if outcomes is None:
                outcomes = self._outcomes[key] = deque(maxlen=RECENT_OUTCOMES)
                self._times[key] = deque()
                self._attributes[key] = dict(sorted(zip(self.labels, key, strict=True)))
            outcomes.append(status)
            times = self._times[key]
            times.append(now)
            while times[0] < now - RATE_WINDOW_S:
                times.popleft()

    def ratios(self, status: str) -> list[Observation]:
        """Per label set, the share of recent outcomes that are `status`."""
        with self._lock:
            return [
                Observation(sum(1 for s in outcomes if s == status) / len(outcomes), self._attributes[key])
                for key, outcomes in self._outcomes.items()
                if outcomes
            ]

    def per_second(self) -> list[Observation]:
        """Per label set, the recent rate of ends."""
        now = time.monotonic()
        window = _window_s(now)
        with self._lock:
            observations = []
            for key, times in self._times.items():
                while times and times[0] < now - RATE_WINDOW_S:
                    times.popleft()
                observations.append(Observation(len(times) / window, self._attributes[key]))
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
        window = _window_s(now)
        while self._past and self._past[0][0] < now - RATE_WINDOW_S:
            self._past.popleft()
        recent = self._count if self._second >= now - RATE_WINDOW_S else 0
        return [Observation((sum(count for _, count in list(self._past)) + recent) / window)]


class HistogramRecorder(Protocol):
    """What records into a histogram: an amount under label values (in the order of its labels)."""

    def record(self, amount: float, key: tuple[str, ...]) -> None:
        """Add `amount` under the label values `key`."""


class _Point:
    """One label set's cumulative explicit-bucket state (what the SDK keeps per attribute set)."""

    __slots__ = ("attributes", "counts", "max", "min", "start", "sum")

    def __init__(self, attributes: dict[str, Any], buckets: int) -> None:
        self.attributes = attributes
        self.counts = [0] * buckets
        self.sum: float = 0
        self.min = math.inf
        self.max = -math.inf
        self.start = time.time_ns()


class LocalHistogram:
    """A histogram aggregated here and handed to every metric reader at its collection as the
    SDK's own would be: a cumulative explicit-bucket histogram under the same name, unit,
    description, boundaries and attributes, with the same counts, sum, min and max (tested
    against the SDK). An SDK measurement costs ~9-30 µs (it cleans and hashes the attributes, and
    makes a Measurement and its context per value); this costs a dict lookup and a bisect. Only
    for readers that take cumulative default-aggregated histograms: `Instruments` falls back to
    SDK instruments otherwise (a delta OTLP reader, say)."""

    def __init__(self, name: str, unit: str, description: str, labels: tuple[str, ...], bounds: Sequence[float]):
        self.name, self.unit, self.description, self.labels = name, unit, description, labels
        self.bounds = tuple(bounds)
        self._points: dict[tuple[str, ...], _Point] = {}
        self._overflow: _Point | None = None
        self._lock = threading.Lock()  # an OTLP reader collects from its own thread

    def record(self, amount: float, key: tuple[str, ...]) -> None:
        """Add `amount` under the label values `key` (dropped, as the SDK drops it, if negative
        or not finite)."""
        if not 0 <= amount < math.inf:  # NaN fails both
            log.warning("histogram %s: amount %s is negative or not finite, ignored", self.name, amount)
            return
        with self._lock:
            point = self._points.get(key) or self._point(key)
            point.counts[bisect_left(self.bounds, amount)] += 1
            point.sum += amount
            if amount < point.min:
                point.min = amount
            if amount > point.max:
                point.max = amount

    def _point(self, key: tuple[str, ...]) -> _Point:
        if len(self._points) < CARDINALITY_LIMIT:
            point = self._points[key] = _Point(dict(zip(self.labels, key, strict=True)), len(self.bounds) + 1)
            return point
        if self._overflow is None:
            self._overflow = _Point(dict(OVERFLOW_ATTRIBUTES), len(self.bounds) + 1)
        return self._overflow

    def metric(self, now_ns: int) -> Metric | None:
        """The histogram as the SDK's collection would show it now (None before any record)."""
        with self._lock:
            points = [*self._points.values(), *([self._overflow] if self._overflow else [])]
            data = [
                HistogramDataPoint(
                    attributes=point.attributes,
                    start_time_unix_nano=point.start,
                    time_unix_nano=now_ns,
                    count=sum(point.counts),
                    sum=point.sum,
                    bucket_counts=tuple(point.counts),
                    explicit_bounds=self.bounds,
                    min=point.min,
                    max=point.max,
                    exemplars=[],
                )
                for point in points
            ]
        if not data:
            return None
        histogram = HistogramData(data_points=data, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        return Metric(name=self.name, description=self.description, unit=self.unit, data=histogram)


class SdkHistogram:
    """The same interface over an SDK histogram instrument, for readers LocalHistogram cannot serve."""

    def __init__(
        self, meter: Any, name: str, unit: str, description: str, labels: tuple[str, ...], bounds: Sequence[float]
    ):
        self.labels = labels
        self._attributes: dict[tuple[str, ...], dict[str, str]] = {}  # made once per label set
        self._instrument = meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=bounds
        )

    def record(self, amount: float, key: tuple[str, ...]) -> None:
        """Add `amount` under the label values `key`."""
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = self._attributes[key] = dict(zip(self.labels, key, strict=True))
        self._instrument.record(amount, attributes)


def takes_local_histograms(reader: MetricReader) -> bool:
    """Whether `reader` wants histograms as LocalHistogram makes them: cumulative, explicit
    buckets as the instrument advises, the default cardinality limit, collected through the
    SDK's collect callback. (Reads the SDK's private per-reader settings; if they move, the
    answer is no and the SDK's instruments are used.)"""
    temporality = _for_histograms(getattr(reader, "_instrument_class_temporality", None))
    aggregation = _for_histograms(getattr(reader, "_instrument_class_aggregation", None))
    limit = _for_histograms(getattr(reader, "_instrument_class_cardinality_limit", None), CARDINALITY_LIMIT)
    return (
        temporality is AggregationTemporality.CUMULATIVE
        and _explicit_buckets(aggregation)
        and limit == CARDINALITY_LIMIT
        and callable(getattr(reader, "_collect", None))
    )


def _explicit_buckets(aggregation: Any) -> bool:
    """The SDK's default for histograms, or explicit buckets as the instrument advises with min
    and max (what the OTLP exporter asks for unless told otherwise)."""
    if type(aggregation) is DefaultAggregation:
        return True
    return (
        type(aggregation) is ExplicitBucketHistogramAggregation
        and getattr(aggregation, "_boundaries", ()) is None
        and getattr(aggregation, "_record_min_max", False) is True
    )


def _for_histograms(by_class: Any, default: Any = None) -> Any:
    """A reader's setting for the SDK's histogram class (its keys are the concrete subclasses)."""
    for cls, value in dict(by_class or {}).items():
        if isinstance(cls, type) and issubclass(cls, SdkHistogramInstrument):
            return value
    return default


def add_to_collections(reader: MetricReader, histograms: Sequence[LocalHistogram], resource: Resource) -> None:
    """Make `reader`'s collections include `histograms`, in spear's scope: the SDK's collect
    callback (which `MetricReader.collect` calls) is wrapped."""
    hooked: Any = reader  # the SDK's annotation of `_collect` is not what it calls it with
    collect = hooked._collect  # the one hook the SDK gives a reader's collection
    assert collect is not None

    def collect_with_histograms(reader: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        data: MetricsData | None = collect(reader, timeout_millis=timeout_millis)
        now = time.time_ns()
        metrics = [metric for metric in (h.metric(now) for h in histograms) if metric is not None]
        return with_metrics(data, metrics, resource) if metrics else data

    hooked._collect = collect_with_histograms


def with_metrics(data: MetricsData | None, metrics: list[Metric], resource: Resource) -> MetricsData:
    """`data` with `metrics` added to spear's scope (made if `data` has none)."""
    if data is None or not data.resource_metrics:
        scope = InstrumentationScope(SCOPE)
        scoped = ScopeMetrics(scope=scope, metrics=metrics, schema_url=scope.schema_url or "")
        return MetricsData([ResourceMetrics(resource=resource, scope_metrics=[scoped], schema_url=resource.schema_url)])
    first, *others = data.resource_metrics
    scopes = list(first.scope_metrics)
    for index, scoped in enumerate(scopes):
        if scoped.scope.name == SCOPE:
            scopes[index] = dataclasses.replace(scoped, metrics=[*scoped.metrics, *metrics])
            break
    else:
        scope = InstrumentationScope(SCOPE)
        scopes.append(ScopeMetrics(scope=scope, metrics=metrics, schema_url=scope.schema_url or ""))
    return MetricsData([dataclasses.replace(first, scope_metrics=scopes), *others])


class Instruments:
    """spear's OpenTelemetry instruments and the Prometheus reader behind /metrics."""

    def __init__(self, readers: Sequence[MetricReader] = ()) -> None:
        all_readers = [PrometheusMetricReader(), *readers]
        resource = Resource.create(_resource_attributes)
        # (shut down by the component's stop, in bounded time, not again at exit: as tracing's)
        provider = MeterProvider(metric_readers=all_readers, resource=resource, shutdown_on_exit=False)
        self.provider = provider
        meter = provider.get_meter(SCOPE)
        local = all(takes_local_histograms(reader) for reader in all_readers)
        histograms: list[LocalHistogram] = []

        def histogram(
            name: str, unit: str, description: str, labels: tuple[str, ...], bounds: Sequence[float]
        ) -> HistogramRecorder:
            if not local:
                return SdkHistogram(meter, name, unit, description, labels, bounds)
            made = LocalHistogram(name, unit, description, labels, bounds)
            histograms.append(made)
            return made

        self.finished_recent = Recent(("task_id", "function_name"))
        self.queue_depths: dict[str, tuple[int, int]] = {}  # task id -> (num_pending, num_ack_pending)

        # requests (both adapters): counted in dicts, observed at collection
        self.requests = Tally(("operation", "transport", "code"))
        meter.create_observable_counter(
            "spear_requests",
            callbacks=[self.requests.observe],
            description="API requests by operation, transport and result code",
        )
        self.request_duration = histogram(
            "spear_request_duration",
            "ms",
            "API request handling time (a SYNC invoke includes the execution)",
            ("operation", "transport"),
            REQUEST_MS_BUCKETS,
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
        # error_code: which failure (probe54: a worker lost and a function's exception were both
        # FAILED); a closed set of codes, as status is
        self.attempts_finished = Tally(("task_id", "function_name", "status", "error_code"))
        meter.create_observable_counter(
            "spear_attempts_finished",
            callbacks=[self.attempts_finished.observe],
            description="Attempts that ended, by status (a retried attempt counts here, not in executions)",
        )
        self.execution_time = histogram(
            "spear_execution_time",
            "ms",
            "Function execution time of the final attempt of finished executions",
            ("task_id", "function_name", "status"),
            MS_BUCKETS,
        )
        self.wait_time = histogram(
            "spear_average_wait_time",
            "ms",
            "Queue wait of first attempts: started minus requested (average = sum / count)",
            ("task_id", "function_name"),
            MS_BUCKETS,
        )
        self.memory_usage = histogram(
            "spear_memory_usage",
            "By",
            "memory_used_bytes of finished executions (growth of the worker's peak RSS)",
            ("task_id", "function_name"),
            BYTES_BUCKETS,
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
        self.jetstream_up: int | None = None
        _gauge(
            meter,
            "spear_jetstream_up",
            "",
            "1 if JetStream answered this scrape's reads, 0 if not (queue and lag figures are then old)",
            self._jetstream_up,
        )

        # queues (read from the worker consumers) and the process
        _gauge(meter, "spear_queue_length", "", "Invocations stored and not yet taken by a worker", self._queue)
        _gauge(meter, "spear_pending_executions", "", "Invocations not finished: queued plus held", self._pending)
        self.task_workers: dict[str, int] = {}  # task id -> workers that said they serve it
        _gauge(
            meter, "spear_task_workers", "", "Worker processes that serve the task, as they last said", self._workers
        )
        _gauge(meter, "spear_process_memory_usage", "By", "Resident memory of this process", _process_memory)
        for reader in all_readers if histograms else []:
            add_to_collections(reader, histograms, resource)

    def _success(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.finished_recent.ratios("EXECUTION_STATUS_COMPLETED")

    def _timeouts(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.finished_recent.ratios("EXECUTION_STATUS_TIMEOUT")

    def _done(self, options: CallbackOptions) -> Iterable[Observation]:
        return self.finished_recent.per_second()

    def _statuses(self, options: CallbackOptions) -> Iterable[Observation]:
        # (the gauge is the service's: a worker's or a projection's /metrics showed it, always 0)
        return self.status_rate.observe(options) if _answering_status_queries else []

    def _queue(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(pending, {"task_id": task}) for task, (pending, _) in list(self.queue_depths.items())]

    def _lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.projection_lag is None else [Observation(self.projection_lag)]

    def _workers(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"task_id": task}) for task, count in list(self.task_workers.items())]

    def _jetstream_up(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.jetstream_up is None else [Observation(self.jetstream_up)]

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
    meters.request_duration.record(seconds * 1000, (operation, transport))


def sync_call(task_id: str, function_name: str, delta: int) -> None:
    """A SYNC call starts (+1) or ends (-1)."""
    instruments().concurrent_requests.add((task_id, function_name), delta)


def answer_status_queries() -> None:
    """This process answers status queries (it runs the service: a gateway, the HTTP API, `spear
    up`): their rate is a metric of its own from now, 0 until the first query."""
    global _answering_status_queries
    _answering_status_queries = True


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


def record_task_workers(counts: dict[str, int]) -> None:
    """How many worker processes serve each task, as they last said."""
    instruments().task_workers = counts


def record_jetstream_up(answered: bool) -> None:
    """Whether JetStream answered the reads made for a scrape."""
    instruments().jetstream_up = int(answered)


def record_projected(events: int) -> None:
    """Count events the projection folded."""
    instruments().projection_events.add((), events)


def record_wait(task_id: str, function_name: str, wait_ms: float) -> None:
    """How long an invocation waited for a worker."""
    instruments().wait_time.record(max(0.0, wait_ms), (task_id, function_name))


def record_attempt(task_id: str, function_name: str, status: str, error_code: str = "") -> None:
    """Count an attempt that ended, by status and error code ("" when it succeeded)."""
    instruments().attempts_finished.add((task_id, function_name, status, error_code))


def record_finished(task_id: str, function_name: str, status: str, execution_time_ms: int, memory_bytes: int) -> None:
    """Count a finished execution, with its time and memory."""
    meters = instruments()
    function = (task_id, function_name)
    meters.executions_finished.add((task_id, function_name, status))
    meters.execution_time.record(execution_time_ms, (task_id, function_name, status))
    meters.memory_usage.record(memory_bytes, function)
    meters.finished_recent.finished(function, status)


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
