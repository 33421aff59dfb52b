"""Traces: one per invocation, carried between processes as the W3C `traceparent` in NATS and HTTP
headers (the SDK's propagator), with OpenTelemetry's messaging conventions.

The caller's context is the parent of the adapter's span (`process P.api.invoke_function` or
`POST /api/v1/invoke`); every event append is a `send` PRODUCER span whose context its NATS
headers carry; a worker's attempt is a `process` CONSUMER span under the `requested` event's
context, with the function's own span inside it. The projection *links* to the contexts it folds
instead of adopting them as parents: it is not part of any one invocation.

Without an exporter, spans are made by a sampler that keeps nothing: ids are still drawn (events
still carry a traceparent) but nothing is recorded, so tracing off costs a few microseconds a span.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
SYSTEM = {"messaging.system": "nats"}

_propagator = TraceContextTextMapPropagator()
_provider = TracerProvider(sampler=ALWAYS_OFF)
_tracer = _provider.get_tracer("spear")
_off = True  # the provider's sampler keeps nothing: spans take the fast path below
_ids = RandomIdGenerator()


def provider(sampler: Sampler, resource: Mapping[str, str]) -> TracerProvider:
    """A tracer provider with `sampler` and `resource`."""
    # shut down by the component's stop, in bounded time (`telemetry.setup`), not again at exit
    # with the exporters' retries unbounded (probe54: 20-30 s with the collector down)
    return TracerProvider(sampler=sampler, resource=Resource.create(dict(resource)), shutdown_on_exit=False)


def use_provider(new: TracerProvider) -> TracerProvider:
    """Make spear's spans go to `new`; returns the provider used until now."""
    global _provider, _tracer, _off
    old, _provider, _tracer = _provider, new, new.get_tracer("spear")
    _off = new.sampler is ALWAYS_OFF
    return old


def current_provider() -> TracerProvider:
    """The tracer provider spear's spans go to."""
    return _provider


def may_record() -> bool:
    """False while tracing is off: callers skip work only a recorded span would use."""
    return not _off


# --- propagation ----------------------------------------------------------------------------------

# The propagator's own pattern, limit and header name: a `traceparent` read here is one it accepts.
_TRACEPARENT_RE = re.compile(TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT)
_TRACEPARENT_MAX = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
TRACESTATE = TraceContextTextMapPropagator._TRACESTATE_HEADER_NAME
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_EMPTY = otel_context.Context()


def _accepted(traceparent: str) -> re.Match[str] | None:
    """`traceparent` matched (version, trace id, span id, flags, rest), if the propagator accepts it."""
    m = _TRACEPARENT_RE.search(traceparent)
    if m is None or m[2] == _ZERO_TRACE or m[3] == _ZERO_SPAN or m[1] == "ff" or (m[1] == "00" and m[5]):
        return None
    return m


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The context a message or HTTP request carries, or None if it carries none (or a bad one).
    A lone `traceparent` (what spear's events and clients carry) is read here with the
    propagator's pattern and checks, without its getter and generic steps (4 µs less a message;
    `tests/test_tracing.py` checks both give the same); anything else goes through the propagator."""
    if not headers or TRACEPARENT not in headers:
        return None
    value = headers[TRACEPARENT]
    if TRACESTATE in headers or not isinstance(value, str) or len(value) > _TRACEPARENT_MAX:
        ctx = _propagator.extract(headers)
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None
    m = _accepted(value)
    if m is None:
        return None
    carried = SpanContext(int(m[2], 16), int(m[3], 16), is_remote=True, trace_flags=TraceFlags(int(m[4], 16)))
    return trace.set_span_in_context(NonRecordingSpan(carried), _EMPTY)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's context to `headers` (the W3C `traceparent`)."""
    _propagator.inject(headers)
    return headers


def inject_unsampled(headers: dict[str, str], parent_headers: Mapping[str, str] | None) -> dict[str, str]:
    """Tracing off: add to `headers` what `inject` adds inside `producer(..., parent_headers)`
    (the context of a fresh span id under the parent `parent_headers` carry, else under the current
    span, else of a new trace; the parent's sampled flag and trace state passed on) without
    making the span, extracting a context or making one current: one string formatted.
    `tests/test_tracing.py` checks it against that. A parent with a trace state in its headers
    takes the long way (rare: nothing in spear sets one)."""
    trace_id = flags = state = ""
    if parent_headers and TRACEPARENT in parent_headers:
        value = parent_headers[TRACEPARENT]
        if TRACESTATE in parent_headers or not isinstance(value, str) or len(value) > _TRACEPARENT_MAX:
            with _Unsampled(extract(parent_headers)):
                return inject(headers)
        m = _accepted(value)  # what the propagator refuses leaves the current span the parent
        if m is not None:
            trace_id, flags = m[2], m[4]
    if not trace_id:
        above = trace.get_current_span().get_span_context()
        if above.is_valid:
            trace_id, flags = f"{above.trace_id:032x}", f"{above.trace_flags:02x}"
            state = above.trace_state.to_header() if above.trace_state else ""
        else:
            trace_id, flags = f"{_ids.generate_trace_id():032x}", "00"
    headers[TRACEPARENT] = f"00-{trace_id}-{_ids.generate_span_id():016x}-{flags}"
    if state:
        headers[TRACESTATE] = state
    return headers


def rooted(headers: dict[str, str] | None) -> dict[str, str] | None:
    """Tracing off: `headers`, with the `traceparent` of a new unsampled root added if neither
    they nor the current context carry a trace, so that events appended together (a gateway-run
    call's chain) share one trace, as they do under a recorded span; else `headers` as they are."""
    if _carries_trace(headers) or trace.get_current_span().get_span_context().is_valid:
        return headers
    root = f"00-{_ids.generate_trace_id():032x}-{_ids.generate_span_id():016x}-00"
    return {**(headers or {}), TRACEPARENT: root}


def _carries_trace(headers: Mapping[str, str] | None) -> bool:
    """`extract(headers) is not None`, without making the context for a lone `traceparent`."""
    if not headers or TRACEPARENT not in headers:
        return False
    value = headers[TRACEPARENT]
    if TRACESTATE in headers or not isinstance(value, str) or len(value) > _TRACEPARENT_MAX:
        return extract(headers) is not None
    return _accepted(value) is not None


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span in hex, or empty strings."""
    ctx = trace.get_current_span().get_span_context()
    return (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}") if ctx.is_valid else ("", "")


# --- spans ----------------------------------------------------------------------------------------


def span(
    name: str,
    kind: SpanKind,
    parent: otel_context.Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] = (),
) -> AbstractContextManager[Span]:
    """A span made current for the block; attributes are set only when it is recorded, an
    exception marks it as an error. `parent=None` means: the current context."""
    if _off:
        return _Unsampled(parent)
    return _recorded(name, kind, parent, attributes, links)


class _Unsampled:
    """Tracing off: a child context with a fresh span id that records nothing, as the SDK's
    ALWAYS_OFF sampler makes, without its machinery (a few times cheaper per span), except that
    the caller's sampled flag is passed on: components that do trace record what it sampled."""

    __slots__ = ("_parent", "_token")

    def __init__(self, parent: otel_context.Context | None) -> None:
        self._parent = parent
        self._token: object = None

    def __enter__(self) -> Span:
        base = self._parent if self._parent is not None else otel_context.get_current()
        above = trace.get_current_span(base).get_span_context()
        valid = above.is_valid
        context = SpanContext(
            above.trace_id if valid else _ids.generate_trace_id(),
            _ids.generate_span_id(),
            is_remote=False,
            trace_flags=above.trace_flags if valid else TraceFlags(TraceFlags.DEFAULT),
            trace_state=above.trace_state if valid else None,
        )
        current = NonRecordingSpan(context)
        self._token = otel_context.attach(trace.set_span_in_context(current, base))
        return current

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


class _Adopted:
    """Tracing off: `parent` (the caller's context) made current for the block, if there is one;
    the spans made inside (say, an append's) are its children, or roots of a new trace."""

    __slots__ = ("_parent", "_token")

    _none = NonRecordingSpan(SpanContext(0, 0, is_remote=False))

    def __init__(self, parent: otel_context.Context | None) -> None:
        self._parent = parent
        self._token: object = None

    def __enter__(self) -> Span:
        if self._parent is None:
            return self._none
        self._token = otel_context.attach(self._parent)
        return trace.get_current_span(self._parent)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


@contextmanager
def _recorded(
    name: str,
    kind: SpanKind,
    parent: otel_context.Context | None,
    attributes: Mapping[str, Any] | None,
    links: Sequence[Link],
) -> Iterator[Span]:
    with _tracer.start_as_current_span(
        name, context=parent, kind=kind, links=links, record_exception=True, set_status_on_exception=True
    ) as current:
        if attributes and current.is_recording():
            current.set_attributes(attributes)
        yield current


def consumer(
    name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any]
) -> AbstractContextManager[Span]:
    """`process <destination>`: a CONSUMER span under the context the message carries. Tracing
    off, no span is made (nothing would record it): the context the message carries, if any, is
    made current, so what the request stores continues the caller's trace."""
    if _off:
        return _Adopted(extract(headers))
    return span(f"process {name}", SpanKind.CONSUMER, extract(headers), {**SYSTEM, **attributes})


def producer(
    destination: str, template: str, attributes: Mapping[str, Any], parent_headers: Mapping[str, str] | None
) -> AbstractContextManager[Span]:
    """`send <template>`: a PRODUCER span, under the explicit parent in `parent_headers` if any (say,
    the invocation's trace for a cancel request), linked then to the current span."""
    parent = extract(parent_headers)
    if _off:
        return _Unsampled(parent)
    links: list[Link] = []
    here = trace.get_current_span().get_span_context()
    if (
        parent is not None
        and here.is_valid
        and here.trace_id != trace.get_current_span(parent).get_span_context().trace_id
    ):
        links.append(Link(here))
    attributes = {
        **SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": destination,
        "messaging.destination.template": template,
        **attributes,
    }
    return span(f"send {template}", SpanKind.PRODUCER, parent, attributes, links)


def links_to(headers: Sequence[Mapping[str, str] | None]) -> list[Link]:
    """Links to the contexts stored messages carry (a projection folds them, it does not continue them)."""
    links = []
    for carrier in headers:
        ctx = extract(carrier)
        if ctx is not None:
            links.append(Link(trace.get_current_span(ctx).get_span_context()))
    return links


def mark_error(current: Span, message: str) -> None:
    """Mark `current` as failed with `message` (if it is recorded)."""
    if current.is_recording():
        current.set_status(Status(StatusCode.ERROR, message))


def mark_current_error(message: str) -> None:
    """Mark the current span as failed with `message` (if one is recorded)."""
    mark_error(trace.get_current_span(), message)


# --- export ---------------------------------------------------------------------------------------


class JsonLinesExporter(SpanExporter):
    """Finished spans as JSON lines in a file (the SDK's own JSON form of a span): for debugging,
    and for tests that follow a trace into another process without a collector."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by shutdown)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append `spans` to the file, one JSON line each."""
        for finished in spans:
            self._file.write(json.dumps(json.loads(finished.to_json(indent=None))) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Close the file."""
        self._file.close()
