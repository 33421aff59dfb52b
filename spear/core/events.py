"""The event log's vocabulary: one tagged msgspec Struct per event kind, encode/decode.

Pure. Tags are explicit and stable (they are the `kind` token of the subject and the `type`
field on the wire), so renaming a class never breaks stored events. New fields need defaults.

The storage format is its own: `StoredResult` and `StoredContext` mirror the API's ExecutionResult
and ExecutionContext field for field (CONTRACT §4: a terminal event carries the full result), but
an API change is not a storage change. `spear.core.convert` translates between the two.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, TypedDict, TypeGuard, get_args

import msgspec

from spear.core.contract import elapsed_ms, format_timestamp
from spear.core.enums import ErrorCode, ExecutionMode, ExecutionStatus


class StoredResult(msgspec.Struct):
    """An execution's outcome as events store it (the wire shape of ExecutionResult)."""

    status: ExecutionStatus
    result: Any = None
    error_message: str = ""
    error_code: str = ""
    execution_time_ms: int = 0
    memory_used_bytes: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    attempt: int = 0
    metrics: dict[str, Any] = {}
    instance_id: str = ""  # the task instance that ran it (registered tasks)


class StoredContext(msgspec.Struct):
    """The invocation's context as the `requested` event stores it (the shape of ExecutionContext)."""

    execution_id: str = ""
    timeout_ms: int = 0
    max_retries: int | None = None
    session_id: str = ""
    user_id: str = ""
    environment: dict[str, str] = {}
    headers: dict[str, str] = {}


class Event(msgspec.Struct, tag_field="type", kw_only=True):
    """Fields every event carries (CONTRACT §4)."""

    execution_id: str
    task_id: str
    function_name: str
    at: str
    attempt: int = 0

    @property
    def kind(self) -> str:
        """The event's tag: its `type` field and the last token of its subject."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)  # every event class sets an explicit string tag
        return tag


class Requested(Event, tag="requested"):
    """An invocation was accepted. Holds everything a worker needs to run it."""

    execution_mode: ExecutionMode
    parameters: dict[str, Any] = {}
    timeout_ms: int = 0
    max_retries: int = 0
    fingerprint: str = ""  # identifies the request, for idempotent re-invocation
    context: StoredContext = msgspec.field(default_factory=StoredContext)
    invocation_metadata: dict[str, str] = {}
    force_new_instance: bool = False


class Started(Event, tag="started"):
    """A worker began an attempt."""

    worker_id: str = ""
    instance_id: str = ""


class Retrying(Event, tag="retrying"):
    """An attempt failed (or its worker was lost) and another one follows after `delay_ms`."""

    result: StoredResult  # the outcome of the attempt that failed
    delay_ms: int = 0
    reason: str = ""


class Logged(Event, tag="log"):
    """A log line or progress report from the running function."""

    message: str = ""
    progress: float | None = None


class Chunk(Event, tag="chunk"):
    """One item a streaming function yielded: `seq` counts from 0 in each attempt."""

    seq: int
    data: Any = None


class Released(Event, tag="released"):
    """A worker stopping cleanly handed its running attempt back: the attempt is not used up, and
    the same attempt number runs again (on any worker). Only a real crash counts (WORKER_LOST)."""

    worker_id: str = ""
    reason: str = ""


class CancelRequested(Event, tag="cancel_requested"):
    """Someone asked a running execution to stop; `force` stops it without waiting for it."""

    reason: str = ""
    force: bool = False


class Completed(Event, tag="completed"):
    """The function returned; `result.result` is its value."""

    result: StoredResult


class Failed(Event, tag="failed"):
    """The execution failed for good (no attempts left, or not worth retrying)."""

    result: StoredResult


class TimedOut(Event, tag="timed_out"):
    """The last attempt ran past its time limit."""

    result: StoredResult


class Cancelled(Event, tag="cancelled"):
    """The execution was cancelled: before it started, or while it ran."""

    result: StoredResult
    reason: str = ""


TerminalEvent = Completed | Failed | TimedOut | Cancelled
AnyEvent = (
    Requested
    | Started
    | Retrying
    | Logged
    | Chunk
    | Released
    | CancelRequested
    | Completed
    | Failed
    | TimedOut
    | Cancelled
)
TERMINAL_KINDS = ("completed", "failed", "timed_out", "cancelled")
EVENT_KINDS = frozenset(str(kind.__struct_config__.tag) for kind in get_args(AnyEvent))

_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


def encode_event(event: Event) -> bytes:
    """An event as stored: JSON with its `type` tag."""
    return _encoder.encode(event)


class BadEvent(ValueError):
    """Stored (or live) bytes that are not an event of the execution their subject names."""


def decode_event(data: bytes, subject: str | None = None) -> AnyEvent:
    """Decode an event; with its subject (`P.exec.<task>.<id>.<kind>`), also check that the body
    is the event the subject names. The subject is the authority: a body that disagrees with it
    is refused, like bytes that are not an event at all (any failure is one BadEvent, so every
    reader survives whatever bytes are stored)."""
    try:
        event = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadEvent(f"not an event: {type(exc).__name__}: {str(exc)[:200]}") from None
    if subject is not None:
        tokens = subject.split(".")
        claimed = tuple(tokens[-3:]) if len(tokens) >= 4 else ()
        if claimed != (event.task_id, event.execution_id, event.kind):
            raise BadEvent(
                f"a {event.kind} event of {event.task_id[:128]}/{event.execution_id[:128]} stored under {subject[:300]}"
            )
    return event


def is_terminal(event: Event) -> TypeGuard[TerminalEvent]:
    """Whether `event` ends its execution (exactly one such event per execution)."""
    return isinstance(event, (Completed, Failed, TimedOut, Cancelled))


def terminal_event_type(status: ExecutionStatus) -> type[Completed | Failed | TimedOut | Cancelled]:
    """The event kind that records an execution ending in `status`."""
    return _TERMINAL_BY_STATUS[status]


_TERMINAL_BY_STATUS: dict[ExecutionStatus, type[Completed | Failed | TimedOut | Cancelled]] = {
    ExecutionStatus.COMPLETED: Completed,
    ExecutionStatus.FAILED: Failed,
    ExecutionStatus.TIMEOUT: TimedOut,
    ExecutionStatus.CANCELLED: Cancelled,
}


# --- building events: the envelope every event carries, and the results the system writes ------


class Envelope(TypedDict):
    """The fields every event carries (CONTRACT §4), to splat into an event's constructor."""

    execution_id: str
    task_id: str
    function_name: str
    at: str
    attempt: int


class OfExecution(Protocol):
    """Anything that names an execution: a `requested` event, an ExecutionState."""

    @property
    def execution_id(self) -> str:
        """The execution's id."""

    @property
    def task_id(self) -> str:
        """The task it runs in."""

    @property
    def function_name(self) -> str:
        """The function it runs."""


def envelope(of: OfExecution, attempt: int, at: str | None = None) -> Envelope:
    """The common fields of a new event of `of`'s execution, stamped now unless `at` is given."""
    return Envelope(
        execution_id=of.execution_id,
        task_id=of.task_id,
        function_name=of.function_name,
        at=at or format_timestamp(time.time()),
        attempt=attempt,
    )


def failure(status: ExecutionStatus, code: ErrorCode, message: str, env: Envelope) -> StoredResult:
    """A result the system writes itself (not the function's), completed at the envelope's time."""
    return StoredResult(
        status=status, error_code=code, error_message=message, attempt=env["attempt"], completed_at=env["at"]
    )


def cancelled(env: Envelope, reason: str, started_at: str | None) -> Cancelled:
    """The terminal event of a cancellation: before it started (`started_at` None) or while it ran."""
    result = failure(ExecutionStatus.CANCELLED, ErrorCode.CANCELLED, f"cancelled: {reason or 'on request'}", env)
    result.started_at = started_at
    result.execution_time_ms = elapsed_ms(started_at, env["at"])
    return Cancelled(**env, result=result, reason=reason)
