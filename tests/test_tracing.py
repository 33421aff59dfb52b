"""One connected trace per invocation, recorded with the SDK's in-memory exporter: from the caller's
traceparent through the gateway, the `requested` event, the worker's attempt and the function's
own span to the terminal event; the projection links to it. A worker in another process writes
its spans to a JSON lines file (`[telemetry] traces_file`), and they join the same trace."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator

import hypothesis
import hypothesis.strategies as st
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spear.core.enums import ExecutionStatus
from spear.telemetry import tracing
from tests.conftest import invoke_body
from tests.processes import spawn, stop, wait_for_pullers

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    previous = tracing.use_provider(provider)
    yield memory
    tracing.use_provider(previous)


def _hex(number: int, width: int) -> str:
    return f"{number:0{width}x}"


async def _spans(exporter: InMemorySpanExporter, *names: str, timeout: float = 5.0) -> dict[str, ReadableSpan]:
    """The caller's trace's spans by name, once every name in `names` has ended."""
    for _ in range(int(timeout / 0.02)):
        spans = {s.name: s for s in exporter.get_finished_spans() if _hex(s.context.trace_id, 32) == CALLER_TRACE}
        if all(name in spans for name in names):
            return spans
        await asyncio.sleep(0.02)
    raise AssertionError(f"missing spans: {set(names) - set(spans)}; have {sorted(spans)}")


async def test_one_trace_from_invoke_to_completion(spear, client, exporter):
    p = spear.names.prefix
    data = json.dumps(invoke_body("echo", value=7)).encode()
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    reply = json.loads((await client.request(spear.names.api("invoke_function"), data, 5, headers=headers)).data)
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED
    gateway, requested = f"process {p}.api.invoke_function", f"send {p}.append.demo.{{execution_id}}.requested"
    attempt, function = f"process {p}.exec.demo.{{execution_id}}.requested", "function demo.echo"
    started, completed = (
        f"send {p}.append.demo.{{execution_id}}.started",
        f"send {p}.append.demo.{{execution_id}}.completed",
    )
    spans = await _spans(exporter, gateway, requested, attempt, function, started, completed)

    def parent_of(name: str) -> str:
        parent = spans[name].parent
        assert parent is not None, f"{name} has no parent"
        return _hex(parent.span_id, 16)

    def span_id(name: str) -> str:
        return _hex(spans[name].context.span_id, 16)

    assert parent_of(gateway) == CALLER_SPAN  # the caller's traceparent, from the NATS header
    assert parent_of(requested) == span_id(gateway)
    assert parent_of(attempt) == span_id(requested)  # across JetStream, through the event's headers
    assert parent_of(function) == span_id(attempt)
    assert parent_of(started) == parent_of(completed) == span_id(attempt)
    kinds = {name: spans[name].kind for name in (gateway, requested, attempt, function, completed)}
    assert kinds == {
        gateway: SpanKind.CONSUMER,
        requested: SpanKind.PRODUCER,
        attempt: SpanKind.CONSUMER,
        function: SpanKind.INTERNAL,
        completed: SpanKind.PRODUCER,
    }
    for name in (gateway, requested, attempt, completed):
        assert spans[name].attributes["messaging.system"] == "nats"
    assert spans[requested].attributes["messaging.destination.name"] == (
        f"{p}.append.demo.{reply['execution_id']}.requested"
    )
    assert spans[attempt].attributes["messaging.consumer.group.name"] == spear.names.worker_consumer("demo")

    # The stored event carries the PRODUCER span's context, and the projection links to it.
    stored = await client.jetstream().get_last_msg(
        spear.names.stream, spear.names.event("demo", reply["execution_id"], "completed")
    )
    assert stored.headers["traceparent"] == f"00-{CALLER_TRACE}-{span_id(completed)}-01"
    await spear.caught_up()
    linked = {
        _hex(link.context.span_id, 16)
        for s in exporter.get_finished_spans()
        if s.name == f"process {p}.exec.>"
        for link in s.links
    }
    assert {span_id(requested), span_id(completed)} <= linked
    projection_traces = {_hex(s.context.trace_id, 32) for s in exporter.get_finished_spans() if s.name.endswith(".>")}
    assert CALLER_TRACE not in projection_traces  # linked, not adopted as parent


async def test_a_failing_function_marks_its_span_as_an_error(spear, client, exporter):
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    data = json.dumps(invoke_body("fail", message="nope")).encode()
    await client.request(spear.names.api("invoke_function"), data, 5, headers=headers)
    span = (await _spans(exporter, "function demo.fail"))["function demo.fail"]
    assert not span.status.is_ok and any(event.name == "exception" for event in span.events)


async def test_the_sdk_carries_the_callers_trace(spear, exporter):
    """probe54: a call made by the SDK inside the application's span began a trace of its own."""
    from opentelemetry import trace

    from spear.client import Client

    caller = SpanContext(int(CALLER_TRACE, 16), int(CALLER_SPAN, 16), True, TraceFlags(TraceFlags.SAMPLED))
    async with Client(spear.settings.nats.urls, prefix=spear.names.prefix) as sdk:
        with trace.use_span(NonRecordingSpan(caller)):
            assert await sdk.invoke("demo", "echo", value=1) == 1
    spans = await _spans(exporter, "function demo.echo")
    received = [s for s in spans.values() if s.kind == SpanKind.CONSUMER and _hex(s.parent.span_id, 16) == CALLER_SPAN]
    assert received, sorted(spans)


async def test_an_append_its_fence_refuses_is_not_an_error_span(spear, client, exporter):
    """probe54: every forced cancel left an ERROR span (its `cancelled` lost the race to the
    worker's own, as fencing means it to); alerting on span status paged on cancels."""
    from spear.core.events import cancelled, envelope
    from spear.core.eventstore import AppendConflict

    data = json.dumps(invoke_body("echo", value=1)).encode()
    reply = json.loads((await client.request(spear.names.api("invoke_function"), data, 5)).data)
    state = await spear.service.execution_state(reply["execution_id"])
    assert state is not None
    late = cancelled(envelope(state, state.attempt), "late", state.started_at)
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    with pytest.raises(AppendConflict):
        await spear.service.store.append(late, expect_last_seq=1, headers=headers)
    (send,) = [s for s in (await _spans(exporter)).values() if s.name.endswith(".cancelled")]
    assert send.status.is_unset and "spear.append.refused" in send.attributes, (send.status, send.attributes)


async def test_an_attempt_that_times_out_marks_its_span_as_an_error(spear, client, exporter):
    """probe54: a failed function's span was an error, a timed-out attempt's span said nothing."""
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    body = {**invoke_body("sleep", ms=3000), "context": {"timeout_ms": 100, "max_retries": 0}}
    reply = json.loads(
        (await client.request(spear.names.api("invoke_function"), json.dumps(body).encode(), 10, headers=headers)).data
    )
    assert reply["result"]["status"] == ExecutionStatus.TIMEOUT, reply
    for _ in range(100):
        attempts = [
            s
            for s in exporter.get_finished_spans()
            if _hex(s.context.trace_id, 32) == CALLER_TRACE
            and s.kind == SpanKind.CONSUMER
            and s.name.endswith(".requested")
        ]
        if attempts:
            break
        await asyncio.sleep(0.02)
    (attempt,) = attempts
    assert not attempt.status.is_ok and "TIMEOUT" in (attempt.status.description or ""), attempt.status


async def test_http_invoke_continues_the_callers_trace(spear, exporter):
    import aiohttp

    from spear.cli import components
    from tests.processes import free_port

    port = free_port()
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        await components.start_http(stack, spear.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession() as http:
            headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            async with http.post(
                f"http://127.0.0.1:{port}/api/v1/invoke", json=invoke_body("echo", value=1), headers=headers
            ) as response:
                assert response.status == 200
    spans = await _spans(exporter, "POST /api/v1/invoke", "function demo.echo")
    server = spans["POST /api/v1/invoke"]
    assert server.kind == SpanKind.SERVER and _hex(server.parent.span_id, 16) == CALLER_SPAN
    assert server.attributes["http.route"] == "/api/v1/invoke" and server.attributes["http.response.status_code"] == 200


@pytest.mark.slow
async def test_a_worker_process_continues_the_trace_from_the_events_headers(
    settings, client, exporter, tmp_path, monkeypatch
):
    """The gateway records in this process; the worker is `spear worker` in another one, exporting
    to a JSON lines file. Its attempt span's parent is the `requested` event's PRODUCER span."""
    from contextlib import AsyncExitStack

    from tests.conftest import start_spear

    traces = tmp_path / "worker-spans.jsonl"
    monkeypatch.setenv("SPEAR_TELEMETRY__TRACES_FILE", str(traces))
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await spawn("worker", "--nats-url", settings.nats.urls[0], prefix=settings.subject_prefix)
        try:
            await wait_for_pullers(client, running.names.stream, running.names.worker_consumer("demo"), 1)
            headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            reply, _ = await _call_with_headers(running, client, invoke_body("echo", value=3), headers)
            assert reply["result"]["status"] == ExecutionStatus.COMPLETED
        finally:
            assert await stop(worker) == 0
    p = settings.subject_prefix
    requested = (await _spans(exporter, f"send {p}.append.demo.{{execution_id}}.requested"))[
        f"send {p}.append.demo.{{execution_id}}.requested"
    ]
    spans = [json.loads(line) for line in traces.read_text().splitlines()]
    by_name = {s["name"]: s for s in spans if s["context"]["trace_id"] == f"0x{CALLER_TRACE}"}
    attempt = by_name[f"process {p}.exec.demo.{{execution_id}}.requested"]
    assert attempt["parent_id"] == f"0x{_hex(requested.context.span_id, 16)}"
    assert attempt["kind"] == "SpanKind.CONSUMER"
    assert by_name["function demo.echo"]["parent_id"] == attempt["context"]["span_id"]
    assert by_name[f"send {p}.append.demo.{{execution_id}}.completed"]["parent_id"] == attempt["context"]["span_id"]


async def _call_with_headers(running, client, body: dict, headers: dict[str, str]) -> tuple[dict, dict]:
    reply = await client.request(running.names.api("invoke_function"), json.dumps(body).encode(), 10, headers=headers)
    return json.loads(reply.data), reply.headers or {}


HEX = "0123456789abcdef"
TRACEPARENT = st.one_of(
    st.builds(
        lambda version, trace_id, span_id, flags, rest: f"{version}-{trace_id}-{span_id}-{flags}{rest}",
        st.sampled_from(["00", "01", "ff", "0g"]),
        st.one_of(st.just("0" * 32), st.text(HEX, min_size=32, max_size=32), st.just("A" * 32)),
        st.one_of(st.just("0" * 16), st.text(HEX, min_size=16, max_size=16)),
        st.sampled_from(["00", "01", "ff"]),
        st.sampled_from(["", " ", "\t", "\n", "-x", "-"]),
    ),
    st.sampled_from(
        [" \t00-" + "1" * 32 + "-" + "2" * 16 + "-01", "00-" + "1" * 32 + "-" + "2" * 16 + "-01" + " " * 600]
    ),
    st.text(max_size=60),
)
PARENT_HEADERS = st.one_of(
    st.none(),
    st.just({}),
    st.fixed_dictionaries({"traceparent": TRACEPARENT}),
    st.fixed_dictionaries(
        {"Spear-X": st.just("y"), "traceparent": TRACEPARENT, "tracestate": st.sampled_from(["a=b", "a=b ,c=d", "?"])}
    ),
)


def propagators_extract(headers: dict[str, str] | None) -> otel_context.Context | None:
    """`tracing.extract` as it was: the SDK's propagator, and None for no valid context."""
    if not headers or "traceparent" not in headers:
        return None
    ctx = TraceContextTextMapPropagator().extract(headers)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


@hypothesis.settings(max_examples=600, deadline=None)
@hypothesis.given(PARENT_HEADERS)
@hypothesis.example({"traceparent": f"00-{'1' * 32}-{'2' * 16}-01-x"})
@hypothesis.example({"traceparent": f"01-{'1' * 32}-{'2' * 16}-03-x"})  # a later version may say more
def test_extract_reads_what_the_propagator_reads(headers):
    expected = propagators_extract(headers)
    ours = tracing.extract(headers)
    if expected is None:
        assert ours is None
        return
    assert ours is not None and dict(ours).keys() == dict(expected).keys()
    carried, theirs = (
        trace.get_current_span(ours).get_span_context(),
        trace.get_current_span(expected).get_span_context(),
    )
    assert (carried, dict(carried.trace_state)) == (theirs, dict(theirs.trace_state))
    assert type(trace.get_current_span(ours)) is type(trace.get_current_span(expected))


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(PARENT_HEADERS)
def test_a_trace_is_carried_where_extract_finds_one(headers):
    assert tracing._carries_trace(headers) == (tracing.extract(headers) is not None)


CURRENT = st.one_of(
    st.none(),
    st.builds(
        lambda trace_id, span_id, flags, state: SpanContext(
            trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags), trace_state=TraceState(state)
        ),
        st.sampled_from([0, 1, 2**128 - 1, 0x4BF92F3577B34DA6A3CE929D0E0E4736]),
        st.sampled_from([0, 1, 2**64 - 1]),
        st.sampled_from([0, 1, 3]),
        st.sampled_from([[], [("k", "v")]]),
    ),
)


@hypothesis.settings(max_examples=600, deadline=None)
@hypothesis.given(PARENT_HEADERS, CURRENT, st.integers(0, 2**32))
@hypothesis.example({"traceparent": f"00-{'1' * 32}-{'2' * 16}-01-x"}, None, 1)  # version 00 has no more fields
@hypothesis.example({"traceparent": f"00-{'1' * 32}-{'2' * 16}-01", "tracestate": "a=b ,c=d"}, None, 1)
def test_an_unsampled_append_s_traceparent_is_the_one_an_unrecorded_span_would_carry(parent, current, seed):
    """Tracing off, an append's headers get their context from `inject_unsampled`, not from a span
    made current and `inject`: the same headers, in the same order, with the same ids drawn."""
    assert not tracing.may_record()
    base = otel_context.Context() if current is None else trace.set_span_in_context(NonRecordingSpan(current))
    token = otel_context.attach(base)
    try:
        random.seed(seed)
        expected = {"Nats-Expected-Stream": "S", **(parent or {})}
        with tracing._Unsampled(propagators_extract(parent)):  # what `producer` makes, tracing off
            tracing.inject(expected)
        random.seed(seed)
        ours = tracing.inject_unsampled({"Nats-Expected-Stream": "S", **(parent or {})}, parent)
    finally:
        otel_context.detach(token)
    assert list(ours.items()) == list(expected.items())
    assert len(ours["traceparent"]) == 55
