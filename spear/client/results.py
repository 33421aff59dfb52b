"""What the client hands back: an execution's status (`Execution`), its stored events (`Event`)
and the items a STREAM function yields (`Chunk`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from spear.core.enums import TERMINAL_STATUSES
from spear.core.events import TERMINAL_KINDS


@dataclass(frozen=True)
class Execution:
    """An execution's status as GetExecutionStatus reports it. `status` is the contract's full
    name (`EXECUTION_STATUS_COMPLETED`); `state` its short form (`completed`)."""

    id: str
    task_id: str
    function_name: str
    status: str
    result: Any = None
    error_code: str = ""
    error_message: str = ""
    execution_time_ms: int = 0
    attempt: int = 0
    requested_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    progress: float | None = None
    progress_message: str = ""
    traceback: str = ""  # where the function failed, if it raised (`metrics.traceback`)
    logs: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> str:
        """The status as a short word: `pending`, `running`, `completed`, ..."""
        return self.status.removeprefix("EXECUTION_STATUS_").lower()

    @property
    def done(self) -> bool:
        """Whether the execution has ended."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> Execution:
        """An Execution from a GetExecutionStatus reply."""
        info = reply.get("execution") or {}
        result = reply.get("result") or {}
        metrics = result.get("metrics") or {}
        return cls(
            id=info.get("execution_id", ""),
            task_id=info.get("task_id", ""),
            function_name=info.get("function_name", ""),
            status=result.get("status") or info.get("status", ""),
            result=result.get("result"),
            error_code=result.get("error_code", ""),
            error_message=result.get("error_message") or info.get("error_message", ""),
            execution_time_ms=result.get("execution_time_ms") or info.get("execution_time_ms", 0),
            attempt=result.get("attempt") or info.get("attempt", 0),
            requested_at=info.get("requested_at"),
            started_at=result.get("started_at") or info.get("started_at"),
            completed_at=result.get("completed_at") or info.get("completed_at"),
            progress=_number(metrics.get("progress")),
            progress_message=metrics.get("progress_message", ""),
            traceback=metrics.get("traceback", ""),
            logs=list(reply.get("logs") or []),
            raw=dict(reply),
        )


@dataclass(frozen=True)
class Event:
    """One stored event of an execution (CONTRACT §4): `type` is its kind, `seq` its stream
    sequence, `data` the whole event object as stored."""

    seq: int
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """Whether the event ends its execution."""
        return self.type in TERMINAL_KINDS

    @property
    def attempt(self) -> int:
        """The attempt the event belongs to."""
        return int(self.data.get("attempt", 0))

    @property
    def at(self) -> str:
        """When the event happened (RFC 3339)."""
        return str(self.data.get("at", ""))

    @property
    def progress(self) -> float | None:
        """The progress a `log` event reports, if any."""
        value = self.data.get("progress")
        return float(value) if isinstance(value, int | float) else None

    @property
    def message(self) -> str:
        """The message of a `log` event."""
        return str(self.data.get("message", ""))

    @property
    def result(self) -> dict[str, Any]:
        """The ExecutionResult a terminal (or retrying) event carries; {} for others."""
        return dict(self.data.get("result") or {})


def stream_restart(event: Event) -> tuple[int, str] | None:
    """Whether `event`, met after a STREAM execution's items, means its stream starts again from
    the first item: (the attempt that yields from now on, what happened to the one before), else
    None. A failed attempt is followed by `retrying` and the next attempt; one handed back by a
    worker that stopped by `released`, and the same attempt runs again (its items' `seq` count
    from 0 again); one whose worker was lost says nothing, and its `started` comes again."""
    if event.type == "retrying":
        result = event.data.get("result")
        status = str(result.get("status", "")) if isinstance(result, dict) else ""
        # (probe33: a timed-out attempt was said to have failed)
        lost = event.data.get("reason") == "WORKER_LOST"
        ended = "timed out" if status.endswith("TIMEOUT") else "lost its worker" if lost else "failed"
        return event.attempt + 1, f"attempt {event.attempt} {ended}"
    if event.type == "released":
        return event.attempt, f"attempt {event.attempt} was handed back by a worker that stopped"
    if event.type == "started":
        return event.attempt, f"attempt {event.attempt} started again (its worker was lost)"
    return None


class Chunk(NamedTuple):
    """One item a STREAM function yielded: `seq` counts from 0, `data` is its JSON value."""

    seq: int
    data: Any
    attempt: int


def _number(text: Any) -> float | None:
    """A metric's value as a number (the wire carries "0.5"), None if absent or not one."""
    try:
        return None if text is None else float(text)
    except (TypeError, ValueError):
        return None
