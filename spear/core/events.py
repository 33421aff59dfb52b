"""The event log's vocabulary: one tagged msgspec Struct per event kind, encode/decode.

Pure. Tags are explicit and stable (they are the `kind` token of the subject and the `type`
field on the wire), so renaming a class never breaks stored events. New fields need defaults.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from spear.core.contract import ExecutionContext, ExecutionResult


class Event(msgspec.Struct, tag_field="type", kw_only=True):
    """Fields every event carries (CONTRACT §4)."""

    execution_id: str
    task_id: str
    function_name: str
    at: str
    attempt: int = 0

    @property
    def kind(self) -> str:
        return self.__struct_config__.tag  # type: ignore[return-value]


class Requested(Event, tag="requested"):
    """An invocation was accepted. Holds everything a worker needs to run it."""

    execution_mode: str
    parameters: dict[str, Any] = {}
    timeout_ms: int = 0
    max_retries: int = 0
    fingerprint: str = ""  # identifies the request, for idempotent re-invocation
    context: ExecutionContext = msgspec.field(default_factory=ExecutionContext)
    invocation_metadata: dict[str, str] = {}


class Started(Event, tag="started"):
    """A worker began an attempt."""

    worker_id: str = ""


class Retrying(Event, tag="retrying"):
    """An attempt failed (or its worker was lost) and another one follows after `delay_ms`."""

    result: ExecutionResult  # the outcome of the attempt that failed
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


class CancelRequested(Event, tag="cancel_requested"):
    """Someone asked a running execution to stop; `force` stops it without waiting for it."""

    reason: str = ""
    force: bool = False


class Completed(Event, tag="completed"):
    result: ExecutionResult


class Failed(Event, tag="failed"):
    result: ExecutionResult


class TimedOut(Event, tag="timed_out"):
    result: ExecutionResult


class Cancelled(Event, tag="cancelled"):
    result: ExecutionResult
    reason: str = ""


AnyEvent = Union[Requested, Started, Retrying, Logged, Chunk, CancelRequested, Completed, Failed, TimedOut, Cancelled]
TERMINAL_KINDS = ("completed", "failed", "timed_out", "cancelled")
EVENT_KINDS = frozenset(str(kind.__struct_config__.tag) for kind in AnyEvent.__args__)  # type: ignore[attr-defined]

_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> AnyEvent:
    return _decoder.decode(data)


def is_terminal(event: Event) -> bool:
    return event.kind in TERMINAL_KINDS


def terminal_event_type(status: str) -> type:
    """The event kind that records an execution ending in `status`."""
    return _TERMINAL_BY_STATUS[status]


_TERMINAL_BY_STATUS = {
    "EXECUTION_STATUS_COMPLETED": Completed,
    "EXECUTION_STATUS_FAILED": Failed,
    "EXECUTION_STATUS_TIMEOUT": TimedOut,
    "EXECUTION_STATUS_CANCELLED": Cancelled,
}
