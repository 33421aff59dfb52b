"""What a worker writes before it runs anything, given an invocation's last stored event.

`plan` follows `state.next_step`: it records a lost worker (`retrying` or `failed` WORKER_LOST)
or a waiting cancel request (`cancelled`), each fenced on the event it was decided from, and
says which attempt to run next, if any. It needs only an append, so it runs against any
EventStore (the tests use the in-memory one).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from spear.core.contract import elapsed_ms
from spear.core.enums import ErrorCode, ExecutionStatus
from spear.core.events import (
    CancelRequested,
    Envelope,
    Event,
    Failed,
    Requested,
    Retrying,
    Started,
    StoredResult,
    cancelled,
    envelope,
    failure,
)
from spear.core.eventstore import Appended, Stored
from spear.core.state import NextStep, next_step


class Append(Protocol):
    """An append that a worker makes (it adds the invocation's trace)."""

    async def __call__(
        self, event: Event, *, expect_last_seq: int | None = None, msg_id: str | None = None
    ) -> Appended:
        """Store `event`, fenced on `expect_last_seq`, deduplicated by `msg_id`."""


class StartedAt(Protocol):
    """When an attempt of the execution started, as its `started` event says (None: not found)."""

    async def __call__(self, attempt: int) -> str | None:
        """The `at` of the attempt's `started`."""


class Plan(NamedTuple):
    """Run attempt `attempt`, fenced on the execution's event at `last_seq`."""

    attempt: int
    last_seq: int


async def plan(
    append: Append, request: Requested, last: Stored | None, started_at: StartedAt | None = None
) -> Plan | None:
    """Record what `last` calls for; the attempt to run next, or None: the invocation is settled
    (acknowledge it). AppendConflict if the execution moved on since `last` (plan again).
    `started_at` finds when a lost attempt started, for its result, when `last` does not say."""
    step, attempt = next_step(last.event if last else None, request.max_retries)
    if step == NextStep.DONE or last is None:
        return None
    if step == NextStep.CANCEL:
        await append_cancelled(append, request, last, started_at=None)
        return None
    if step == NextStep.FAIL_LOST:
        env = envelope(request, attempt)
        message = f"the worker running attempt {attempt} was lost; no attempts left"
        lost = await _lost(env, message, last, started_at)
        await append(Failed(**env, result=lost), expect_last_seq=last.seq)
        return None
    if step == NextStep.RETRY_LOST:
        env = envelope(request, attempt)
        lost = await _lost(env, f"the worker running attempt {attempt} was lost", last, started_at)
        retrying = Retrying(**env, result=lost, reason=ErrorCode.WORKER_LOST)
        return Plan(attempt + 1, (await append(retrying, expect_last_seq=last.seq)).seq)
    return Plan(attempt, last.seq)


async def _lost(env: Envelope, message: str, last: Stored, started_at: StartedAt | None) -> StoredResult:
    """The result of an attempt whose worker was lost: when it started (probe29: `started_at`
    null, a subscriber to the terminal event could not tell), and how long it ran until then."""
    result = failure(ExecutionStatus.FAILED, ErrorCode.WORKER_LOST, message, env)
    if isinstance(last.event, Started) and last.event.attempt == env["attempt"]:
        result.started_at = last.event.at
    elif started_at is not None:  # (it logged, or streamed, after its `started`)
        result.started_at = await started_at(env["attempt"])
    result.execution_time_ms = elapsed_ms(result.started_at, env["at"])
    return result


async def append_cancelled(append: Append, request: Requested, cancel: Stored, started_at: str | None) -> None:
    """Store `cancelled` after the cancel request at `cancel`. AppendConflict if the execution
    moved on since: it may have ended another way (that end stands), or only been asked to cancel
    again; the caller reads its last event and decides again. (Taking any conflict for an end
    once settled an invocation with no end stored at all: a cancel storm, read from a lagging
    replica, left executions RUNNING for good.)"""
    event = cancel.event
    reason = event.reason if isinstance(event, CancelRequested) else ""
    await append(cancelled(envelope(request, event.attempt), reason, started_at), expect_last_seq=cancel.seq)
