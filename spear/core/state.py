"""ExecutionState and `apply(state, event, seq)`: the only place status transitions are decided.

Pure. The projection, the status query (folding events it reads straight from the stream) and
the tests all fold events through `apply`, so they can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import StrEnum

import msgspec

from spear.core.config import RetrySettings
from spear.core.contract import elapsed_ms, parse_timestamp
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import (
    AnyEvent,
    Cancelled,
    CancelRequested,
    Chunk,
    Completed,
    Failed,
    Logged,
    Released,
    Requested,
    Retrying,
    Started,
    StoredResult,
    TerminalEvent,
    TimedOut,
    is_terminal,
)


class ExecutionState(msgspec.Struct):
    """One execution as its events so far describe it; the projection stores it in the state bucket."""

    execution_id: str
    task_id: str
    function_name: str
    status: ExecutionStatus
    execution_mode: ExecutionMode
    last_seq: int  # stream sequence of the last event applied: makes re-application a no-op
    fingerprint: str = ""
    attempt: int = 0
    max_retries: int = 0
    timeout_ms: int = 0
    requested_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    result: StoredResult | None = None
    last_error: str = ""  # of the latest failed attempt, while retries go on
    cancel_requested: bool = False
    progress: float | None = None  # latest progress the running attempt reported
    progress_message: str = ""
    worker_id: str = ""  # the worker of the latest attempt

    @property
    def terminal(self) -> bool:
        """Whether the execution has ended (its state never changes again)."""
        return self.status.terminal


def apply(state: ExecutionState | None, event: AnyEvent, seq: int) -> ExecutionState | None:
    """Fold one stored event (at stream sequence `seq`) into the state of its execution.

    Events at or below `last_seq` were applied already. A terminal state is final. An event
    before `requested` (a partly replayed history) leaves the state unknown, except a terminal
    one: an execution whose `requested` cannot be read still ends visibly (POISON_MESSAGE).
    """
    if state is not None and (seq <= state.last_seq or state.terminal):
        return state
    if isinstance(event, Requested):
        if state is not None:
            return msgspec.structs.replace(state, last_seq=seq)
        return ExecutionState(
            execution_id=event.execution_id,
            task_id=event.task_id,
            function_name=event.function_name,
            status=ExecutionStatus.PENDING,
            execution_mode=event.execution_mode,
            last_seq=seq,
            fingerprint=event.fingerprint,
            max_retries=event.max_retries,
            timeout_ms=event.timeout_ms,
            requested_at=event.at,
        )
    if state is None:
        return _ended_unread(event, seq)
    if isinstance(event, Started):
        return msgspec.structs.replace(
            state,
            status=ExecutionStatus.RUNNING,
            attempt=event.attempt,
            started_at=event.at,
            progress=None,
            worker_id=event.worker_id,
            last_seq=seq,
        )
    if isinstance(event, Released):  # back to waiting; the attempt was not used up
        return msgspec.structs.replace(state, status=ExecutionStatus.PENDING, progress=None, last_seq=seq)
    if isinstance(event, Retrying):
        return msgspec.structs.replace(
            state,
            status=ExecutionStatus.PENDING,
            attempt=event.attempt,
            last_error=event.result.error_message or event.reason,
            last_seq=seq,
        )
    if isinstance(event, CancelRequested):
        return msgspec.structs.replace(state, cancel_requested=True, last_seq=seq)
    if isinstance(event, Logged):
        if event.progress is None:
            return msgspec.structs.replace(state, last_seq=seq)
        return msgspec.structs.replace(state, progress=event.progress, progress_message=event.message, last_seq=seq)
    if is_terminal(event):
        return _ended(state, event, seq)
    return msgspec.structs.replace(state, last_seq=seq)


def _ended(state: ExecutionState, event: TerminalEvent, seq: int) -> ExecutionState:
    result = event.result
    started_at = result.started_at or state.started_at
    completed_at = result.completed_at or event.at
    if result.status == ExecutionStatus.CANCELLED and not result.execution_time_ms:
        # a cancel stored by whoever did not see the start: time from started to cancelled
        elapsed = elapsed_ms(started_at, completed_at)
        result = msgspec.structs.replace(result, started_at=started_at, execution_time_ms=elapsed)
    return msgspec.structs.replace(
        state,
        status=result.status,
        attempt=result.attempt,
        started_at=started_at,
        completed_at=completed_at,
        result=result,
        last_seq=seq,
    )


def _ended_unread(event: AnyEvent, seq: int) -> ExecutionState | None:
    """A terminal event with no readable `requested` before it (a poison invocation) still shows
    the execution's end; any other event without its `requested` leaves the state unknown."""
    if not isinstance(event, (Completed, Failed, TimedOut, Cancelled)):
        return None
    return ExecutionState(
        execution_id=event.execution_id,
        task_id=event.task_id,
        function_name=event.function_name,
        status=event.result.status,
        execution_mode=ExecutionMode.ASYNC,  # unknown: nothing of the request can be read
        last_seq=seq,
        attempt=event.result.attempt,
        completed_at=event.result.completed_at or event.at,
        result=event.result,
    )


def fold(events: Iterable[tuple[AnyEvent, int]], state: ExecutionState | None = None) -> ExecutionState | None:
    """`apply` each (event, sequence) in turn, from `state` (None: from nothing)."""
    for event, seq in events:
        state = apply(state, event, seq)
    return state


# --- what a worker does with an invocation, given the execution's last stored event -------------


class NextStep(StrEnum):
    """What a worker does with an invocation, given its execution's last stored event."""

    START = "start"  # run attempt n
    RETRY_LOST = "retry_lost"  # attempt n's worker was lost: record it, then run attempt n + 1
    FAIL_LOST = "fail_lost"  # attempt n's worker was lost and no attempt is left: fail WORKER_LOST
    CANCEL = "cancel"  # a cancel request waits: record `cancelled`
    DONE = "done"  # the execution has ended (or does not exist): only acknowledge


def next_step(last: AnyEvent | None, max_retries: int) -> tuple[NextStep, int]:
    """(step, attempt) for an invocation whose execution's last event is `last`.

    A `started` (or a log line or chunk of the attempt) found on (re)delivery means its worker was
    lost: that attempt counts, and the next one follows if retries are left; else the execution
    fails WORKER_LOST. A `released` attempt was handed back by a worker stopping cleanly: the
    same attempt runs again, nothing used up.
    """
    if last is None or is_terminal(last):
        return NextStep.DONE, 0
    if isinstance(last, CancelRequested):
        return NextStep.CANCEL, max(1, last.attempt)
    if isinstance(last, Released):
        return NextStep.START, last.attempt
    if isinstance(last, (Started, Logged, Chunk)):
        if last.attempt < max_retries + 1:
            return NextStep.RETRY_LOST, last.attempt
        return NextStep.FAIL_LOST, last.attempt
    if isinstance(last, Retrying):
        return NextStep.START, last.attempt + 1
    return NextStep.START, 1


def backoff_left_ms(last: AnyEvent | None, now: float) -> int:
    """Milliseconds left of the backoff a `retrying` event asked for (its `at` + `delay_ms`) at
    `now` (epoch seconds); 0 once due, or for any other event. A worker that finds the next attempt
    planned earlier than that (an invocation delivered at once, not after the delay its `retrying`
    asked for) hands it back for the rest of the delay instead of running it early."""
    if not isinstance(last, Retrying) or last.delay_ms <= 0:
        return 0
    due = parse_timestamp(last.at) + last.delay_ms / 1000
    return max(0, math.ceil((due - now) * 1000))


def backoff_ms(attempt: int, initial_ms: int, multiplier: float, max_ms: int, jitter: float, unit_random: float) -> int:
    """Exponential backoff before attempt `attempt + 1`, spread by ±jitter (unit_random in [0, 1))."""
    base = _base_backoff_ms(attempt, initial_ms, multiplier, max_ms)
    return max(0, int(base * (1 + jitter * (2 * unit_random - 1))))


def _base_backoff_ms(attempt: int, initial_ms: int, multiplier: float, max_ms: int) -> float:
    """initial × multiplier^(attempt-1), capped at max_ms (where the power would overflow too)."""
    if initial_ms <= 0 or max_ms <= 0:
        return 0.0
    if initial_ms >= max_ms:
        return float(max_ms)
    exponent = max(0, attempt - 1)
    # (compared as logarithms: the power itself may be past what a float holds, 1e4 ** 99)
    if multiplier > 1 and exponent * math.log(multiplier) >= math.log(max_ms / initial_ms):
        return float(max_ms)
    return initial_ms * multiplier**exponent


def attempts_ms(timeout_ms: int, max_retries: int, retry: RetrySettings) -> int:
    """The longest every attempt at its time limit and the backoffs between them can take: what a
    SYNC caller waits for, before a grace (the gateway with its `[retry]` settings, the SDK with
    the defaults; probe31: the backoffs were left out)."""
    backoffs_ms = longest_backoffs_ms(
        max_retries, retry.initial_backoff_ms, retry.multiplier, retry.max_backoff_ms, retry.jitter
    )
    return timeout_ms * (max_retries + 1) + backoffs_ms


def longest_backoffs_ms(retries: int, initial_ms: int, multiplier: float, max_ms: int, jitter: float) -> int:
    """The most the backoffs before `retries` retries add up to (each at the top of its jitter):
    what a SYNC caller waits for beside the attempts themselves (probe31)."""
    if retries <= 0 or initial_ms <= 0 or max_ms <= 0:
        return 0
    if initial_ms >= max_ms or multiplier <= 1:
        return math.ceil(retries * min(initial_ms, max_ms) * (1 + jitter))
    # Worked out, not summed term by term (review30: 10**9 retries took the CLI minutes before the
    # gateway refused them): the first `grown` backoffs grow geometrically, the rest are max_ms.
    ratio = math.log(max_ms / initial_ms)
    grown = min(retries, math.ceil(ratio / math.log(multiplier)))
    while grown > 0 and (grown - 1) * math.log(multiplier) >= ratio:  # (as _base_backoff_ms decides)
        grown -= 1
    while grown < retries and grown * math.log(multiplier) < ratio:
        grown += 1
    total = initial_ms * (multiplier**grown - 1) / (multiplier - 1) + (retries - grown) * max_ms
    return math.ceil(total * (1 + jitter))


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ExecutionState)


def encode_state(state: ExecutionState) -> bytes:
    """A state as the state bucket stores it."""
    return _encoder.encode(state)


def decode_state(data: bytes) -> ExecutionState:
    """A state read back from the state bucket."""
    return _decoder.decode(data)
