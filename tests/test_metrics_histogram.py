"""spear's own histograms (`metrics.LocalHistogram`) against the OpenTelemetry SDK's histogram
instrument they replace: fed the same measurements, every reader collects the same metric (name,
unit, description, temporality, attributes, counts, buckets, sum, min, max, exemplars), and the
Prometheus exposition is the same text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import Histogram as SdkHistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from spear.telemetry import metrics
from spear.telemetry.metrics import (
    CARDINALITY_LIMIT,
    MS_BUCKETS,
    HistogramRecorder,
    LocalHistogram,
    SdkHistogram,
    add_to_collections,
    takes_local_histograms,
)

LABELS = ("task_id", "function_name")
NAME, UNIT, DESCRIPTION = "spear_test_duration", "ms", "a test histogram"
RESOURCE = Resource.create({"service.name": "spear-test"})

amounts = st.one_of(
    st.floats(min_value=-10, max_value=400_000),
    st.sampled_from([math.nan, math.inf, -math.inf]),  # dropped, as the SDK drops them
    st.integers(min_value=-5, max_value=400_000),
    st.sampled_from(MS_BUCKETS),  # exactly on a boundary
)
keys = st.tuples(st.sampled_from(["t1", "t2", "a.b"]), st.sampled_from(["f", "g"]))
steps = st.lists(st.one_of(st.tuples(keys, amounts), st.just("collect")), max_size=60)


class Pair:
    """One histogram made both ways, each in a provider of its own with `reader_factory`'s reader."""

    def __init__(self, make_reader: Any, bounds: Sequence[float] = MS_BUCKETS) -> None:
        self.sdk_reader, self.local_reader = make_reader(), make_reader()
        sdk_provider = MeterProvider(metric_readers=[self.sdk_reader], resource=RESOURCE)
        local_provider = MeterProvider(metric_readers=[self.local_reader], resource=RESOURCE)
        self.providers = sdk_provider, local_provider
        assert takes_local_histograms(self.local_reader)
        self.sdk: HistogramRecorder = SdkHistogram(
            sdk_provider.get_meter(metrics.SCOPE), NAME, UNIT, DESCRIPTION, LABELS, bounds
        )
        local = LocalHistogram(NAME, UNIT, DESCRIPTION, LABELS, bounds)
        add_to_collections(self.local_reader, [local], RESOURCE)
        self.local: HistogramRecorder = local
        local_provider.get_meter(metrics.SCOPE)  # the same scope, unused by the local histogram

    def record(self, amount: float, key: tuple[str, ...]) -> None:
        self.sdk.record(amount, key)
        self.local.record(amount, key)

    def close(self) -> None:
        for provider in self.providers:
            provider.shutdown()


def histogram_of(data: MetricsData | None) -> tuple[Any, Metric | None]:
    """(resource and scope, the test histogram) from a collection."""
    if data is None:
        return None, None
    [resource_metrics] = data.resource_metrics
    [scoped] = resource_metrics.scope_metrics
    found = [metric for metric in scoped.metrics if metric.name == NAME]
    where = (resource_metrics.resource, resource_metrics.schema_url, scoped.scope.name, scoped.scope.version)
    return where, found[0] if found else None


def assert_same(sdk: MetricsData | None, local: MetricsData | None) -> None:
    sdk_where, sdk_metric = histogram_of(sdk)
    local_where, local_metric = histogram_of(local)
    if sdk_metric is None:
        assert local_metric is None
        return
    assert local_metric is not None
    assert sdk_where == local_where
    assert (local_metric.name, local_metric.unit, local_metric.description) == (
        sdk_metric.name,
        sdk_metric.unit,
        sdk_metric.description,
    )
    sdk_data, local_data = sdk_metric.data, local_metric.data
    assert local_data.aggregation_temporality == sdk_data.aggregation_temporality  # type: ignore[union-attr]

    def points(data: Any) -> dict[frozenset[tuple[str, Any]], Any]:
        return {frozenset(point.attributes.items()): point for point in data.data_points}

    sdk_points, local_points = points(sdk_data), points(local_data)
    assert sdk_points.keys() == local_points.keys()
    for labels, expected in sdk_points.items():
        got = local_points[labels]
        assert (got.count, tuple(got.bucket_counts), tuple(got.explicit_bounds)) == (
            expected.count,
            tuple(expected.bucket_counts),
            tuple(expected.explicit_bounds),
        )
        assert (got.min, got.max, list(got.exemplars)) == (expected.min, expected.max, list(expected.exemplars))
        # the SDK adds each collection's sum to the last one's: float rounding may differ by an ulp
        assert math.isclose(got.sum, expected.sum, rel_tol=1e-12, abs_tol=1e-9)
        assert type(got.sum) is type(expected.sum)


def otlp_like_reader() -> InMemoryMetricReader:
    """A reader that asks for histograms as the OTLP exporter does by default."""
    return InMemoryMetricReader(preferred_aggregation={SdkHistogramInstrument: ExplicitBucketHistogramAggregation()})


@settings(max_examples=150, deadline=None)
@given(steps=steps, make_reader=st.sampled_from([InMemoryMetricReader, otlp_like_reader]))
def test_local_histograms_collect_what_the_sdk_histogram_collects(steps: list[Any], make_reader: Any) -> None:
    pair = Pair(make_reader)
    for step in [*steps, "collect"]:
        if step == "collect":
            assert_same(pair.sdk_reader.get_metrics_data(), pair.local_reader.get_metrics_data())
        else:
            key, amount = step
            pair.record(amount, key)
    pair.close()


def test_label_sets_past_the_cardinality_limit_overflow_as_in_the_sdk() -> None:
    pair = Pair(InMemoryMetricReader, bounds=(1, 10))
    for n in range(CARDINALITY_LIMIT + 5):
        pair.record(n % 17, (f"task{n}", "f"))
    pair.record(3, ("task0", "f"))  # a label set seen before the limit keeps its own point
    sdk, local = pair.sdk_reader.get_metrics_data(), pair.local_reader.get_metrics_data()
    assert_same(sdk, local)
    _, metric = histogram_of(local)
    assert metric is not None
    assert {"otel.metric.overflow": True} in [dict(point.attributes or {}) for point in metric.data.data_points]
    pair.close()


def test_the_prometheus_exposition_is_the_same_text() -> None:
    registries: list[CollectorRegistry] = []

    def prometheus_reader() -> PrometheusMetricReader:
        registries.append(CollectorRegistry())  # the test's own, not the process's
        return PrometheusMetricReader(registry=registries[-1])

    pair = Pair(prometheus_reader)
    assert generate_latest(registries[0]) == generate_latest(registries[1])
    for n, amount in enumerate([0, 1, 2.5, 3, 7.25, 60_000, 1e9, 12, 0.5]):  # sums exact in binary
        pair.record(amount, (f"t{n % 3}", "f"))
    sdk_text, local_text = generate_latest(registries[0]), generate_latest(registries[1])
    assert b"spear_test_duration_milliseconds_bucket" in local_text
    assert local_text == sdk_text
    pair.close()


def test_only_cumulative_explicit_bucket_readers_take_local_histograms() -> None:
    delta = InMemoryMetricReader(preferred_temporality={SdkHistogramInstrument: AggregationTemporality.DELTA})
    exponential = InMemoryMetricReader(
        preferred_aggregation={SdkHistogramInstrument: ExponentialBucketHistogramAggregation()}
    )
    buckets = InMemoryMetricReader(
        preferred_aggregation={SdkHistogramInstrument: ExplicitBucketHistogramAggregation([1])}
    )
    otlp = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint="http://127.0.0.1:9/v1/metrics"))
    readers = [delta, exponential, buckets, otlp, InMemoryMetricReader(), otlp_like_reader()]
    provider = MeterProvider(metric_readers=readers)
    assert [takes_local_histograms(reader) for reader in readers] == [False, False, False, True, True, True]
    provider.shutdown()
