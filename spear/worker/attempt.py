"""One attempt of one execution: run the function under its time limit, let it be cancelled, and
describe the outcome as an ExecutionResult plus whether another attempt may help."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spear.core import contract
from spear.core.config import RetrySettings
from spear.core.enums import ErrorCode, ExecutionStatus
from spear.core.events import Requested, Retrying, StoredResult, TerminalEvent, envelope, terminal_event_type
from spear.core.jsonlimits import JsonRejected, bounded_text, encode_storable, exception_text
from spear.core.state import backoff_ms
from spear.worker import memory
from spear.worker.context import (
    Context,
    ExecutionCancelled,
    InvalidArgument,
    NonRetryableError,
    ReportedFailure,
    ResultNotSerializable,
    StreamedItems,
    stopped_by_signal,
)
from spear.worker.failures import traceback_of
from spear.worker.inprocess import ChunkSink, run_function, run_inline
from spear.worker.isolation import ProcessPool
from spear.worker.tasks import Function
from spear.worker.threads import FunctionThreads

if TYPE_CHECKING:
    from spear.jetstream.pull import Delivery

MAX_ERROR_CHARS = 65_536  # an error message is cut here: the event that carries it must fit
EVENT_ENVELOPE_BYTES = 16 * 1024  # headers and the event's other fields around a result
# Its own generator: the functions a worker runs share its process, and one that seeds the
# `random` module for repeatable results must not see spear draw from it in between.
JITTER = random.Random()


@dataclass
class Outcome:
    """How an attempt ended, and whether another attempt may help."""

    result: StoredResult
    retryable: bool
    stop_signalled: bool = False  # the function's process was ended by a stop signal (see the worker)


def max_result_bytes(max_payload: int) -> int:
    """What fits in a terminal event: the server's message limit, less room for the envelope."""
    return max(1024, max_payload - EVENT_ENVELOPE_BYTES)


def end_event(
    request: Requested, outcome: Outcome, retry: RetrySettings
) -> tuple[Retrying | TerminalEvent, str | None]:
    """The event that records how an attempt ended, with its message id (deduplicated per
    attempt): `retrying` (after a backoff) if it failed retryably with retries left, else its
    terminal event."""
    result = outcome.result
    if outcome.retryable and result.attempt < request.max_retries + 1:
        delay = backoff_ms(
            result.attempt,
            retry.initial_backoff_ms,
            retry.multiplier,
            retry.max_backoff_ms,
            retry.jitter,
            JITTER.random(),
        )
        # deduplicated too: one stored but not acknowledged (JetStream busy) comes back a duplicate
        retrying = Retrying(
            **envelope(request, result.attempt), result=result, delay_ms=delay, reason=result.error_code
        )
        return retrying, f"{request.execution_id}:retrying:{result.attempt}"
    # stamped when the attempt ended (its result's completed_at), not a moment later
    env = envelope(request, result.attempt, at=result.completed_at)
    return terminal_event_type(result.status)(**env, result=result), f"{request.execution_id}:terminal:{result.attempt}"


class Running:
    """A running attempt, as the worker's cancel listener sees it."""

    def __init__(self, ctx: Context, function: Function | None, delivery: Delivery | None = None):
        self.ctx = ctx
        self.is_coroutine = function is not None and (function.is_coroutine or function.is_async_generator)
        self.task: asyncio.Future[Any] | None = None
        self.released = False  # handed back by a worker stopping cleanly: not a cancellation
        self.returned_at = 0.0  # (monotonic) when the function's call returned or raised, as it did
        self.delivery = delivery  # the invocation's delivery it runs under (None: a gateway runs it)

    def release(self) -> None:
        """The worker stops: end the attempt now (as a forced cancel does) so that it can be
        handed back; its outcome is then not recorded, and the attempt is not used up."""
        self.released = True
        self.cancel(force=True)

    def cancel(self, force: bool) -> None:
        """Cooperative: the function sees `ctx.cancelled`. Coroutines are cancelled outright; with
        `force` a thread-run function is abandoned (its thread finishes on its own) and a
        process-run one is killed."""
        self.ctx.cancel()
        if self.task and (force or self.is_coroutine):
            self.task.cancel()


async def run_attempt(
    function: Function | None,
    parameters: dict[str, Any],
    running: Running,
    timeout_ms: int,
    started_at: str,
    executor: FunctionThreads | None,
    max_result_bytes: int,
    sink: ChunkSink | None = None,
    processes: ProcessPool | None = None,
    stream: bool = False,
    instance_id: str = "",
) -> Outcome:
    """Run one attempt of `function` to its end: returned, raised, timed out or cancelled. Its
    `started` is stored before, unless the function is inline (the caller's `_attempt`)."""
    ctx = running.ctx
    begin = time.monotonic()
    memory_start = memory.baseline()
    status, value, code, message, retryable = ExecutionStatus.COMPLETED, None, "", "", False
    signalled, trace = False, ""
    if ctx.cancelled:  # cancelled (or handed back) while its `started` was being stored: never started
        status, code, message = ExecutionStatus.CANCELLED, ErrorCode.CANCELLED, "cancelled before it started"
    elif function is None:
        status, code = ExecutionStatus.FAILED, ErrorCode.FUNCTION_NOT_FOUND
        message = f"task {ctx.task_id!r} has no function {ctx.function_name!r}"
    elif function.inline:  # declared quick: runs here, to its end (a time limit cannot stop it)
        error: BaseException | None = None
        try:
            value = run_inline(function, parameters, ctx)
        except BaseException as exc:  # (nothing in the call waits: no cancellation of this task gets in)
            error = _failure_of(exc)
        ending = _inline_ending(ctx, error, value, max_result_bytes, begin, timeout_ms)
        status, value, code, message, retryable = ending
        trace = _traceback(error, ending)
    else:
        running.task = task = asyncio.ensure_future(
            _guarded(run_function(function, parameters, ctx, executor, sink, processes, stream), running)
        )
        limit = timeout_ms / 1000
        if not task.done():
            await asyncio.wait({task}, timeout=max(0.0, limit - (time.monotonic() - begin)))
        if not task.done():
            running.cancel(force=True)
            status, code, retryable = ExecutionStatus.TIMEOUT, ErrorCode.TIMEOUT, True
            # (not "attempt N ...": the attempt is the result's, and every reader shows it with the
            # message, probe66 saw "... (attempt 2)" after "attempt 2 ran past ...")
            message = f"the function ran past its time limit of {timeout_ms} ms"
        elif task.cancelled() or (ctx.cancelled and task.exception() is not None):
            status, code, message = ExecutionStatus.CANCELLED, ErrorCode.CANCELLED, "cancelled while running"
        else:
            error = task.exception()
            value = task.result() if error is None else None
            ending = _classify(error, value, max_result_bytes)
            if running.is_coroutine:  # (on the loop: one that blocks it cannot be stopped. A thread's
                # or a child's is stopped at the limit; when its end is seen may be later, under load.)
                ending = _within_limit(ending, begin, running.returned_at, timeout_ms)
            status, value, code, message, retryable = ending
            trace = _traceback(error, ending)
            signalled = stopped_by_signal(error)
    ending = (status, value, code, message, retryable)
    outcome = _outcome(ctx, ending, begin, memory_start, started_at, instance_id, trace)
    outcome.stop_signalled = signalled
    return outcome


def run_inline_now(
    function: Function,
    parameters: dict[str, Any],
    ctx: Context,
    started_at: str,
    max_result_bytes: int,
    timeout_ms: int,
) -> Outcome:
    """`run_attempt` of an inline function (of a code task) with tracing off, called and ended
    here and now, for a worker's quick first attempt (`spear.worker.quick`): the same outcome,
    without a coroutine (nothing in it waits)."""
    begin = time.monotonic()
    memory_start = memory.baseline()
    value: Any = None
    error: BaseException | None = None
    try:
        value = run_inline(function, parameters, ctx)
    except BaseException as exc:
        error = _failure_of(exc)
    ending = _inline_ending(ctx, error, value, max_result_bytes, begin, timeout_ms)
    return _outcome(ctx, ending, begin, memory_start, started_at, "", _traceback(error, ending))


Ending = tuple[ExecutionStatus, Any, str, str, bool]  # (status, value, error_code, error_message, retryable)


def _traceback(error: BaseException | None, ending: Ending) -> str:
    """The traceback of what the function raised, if its attempt failed by it (failures.py)."""
    if error is None or ending[0] != ExecutionStatus.FAILED or ending[2] != ErrorCode.FUNCTION_ERROR:
        return ""
    return traceback_of(error)


def _failure_of(exc: BaseException) -> Exception:
    """What an inline function raised, as its attempt's failure: a BaseException that is no
    Exception (KeyboardInterrupt, SystemExit, even CancelledError: nothing in an inline call waits,
    so none is a cancellation of the worker's task) is an ordinary failure of the function, as
    `_guarded` makes the first two of any function's. Raised on, a CancelledError handed the
    invocation back at once, to be run and raise again, for ever."""
    return exc if isinstance(exc, Exception) else ReportedFailure(exception_text(exc))


def _inline_ending(
    ctx: Context, error: BaseException | None, value: Any, max_result_bytes: int, begin: float, timeout_ms: int
) -> Ending:
    """How an inline call that began at `begin` (monotonic) and has just ended ends its attempt."""
    if ctx.cancelled and error is not None:
        return ExecutionStatus.CANCELLED, None, ErrorCode.CANCELLED, "cancelled while running", False
    return _within_limit(_classify(error, value, max_result_bytes), begin, time.monotonic(), timeout_ms)


def _within_limit(ending: Ending, begin: float, returned_at: float, timeout_ms: int) -> Ending:
    """`ending`, unless the function returned (or raised) past its time limit (`returned_at`,
    monotonic, as the call itself ended: not when the worker's loop got to it, which a busy loop
    makes later). An inline function, or a coroutine that blocks its loop, cannot be stopped at
    the limit: one that ended after it timed out all the same (probe47: stored COMPLETED 8 s into
    a limit of 1 s)."""
    ran_ms = int((returned_at - begin) * 1000)
    if ending[0] not in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED) or not 0 < timeout_ms < ran_ms:
        return ending
    message = f"the function ran past its time limit of {timeout_ms} ms: it ran {ran_ms} ms and could not be stopped"
    return ExecutionStatus.TIMEOUT, None, ErrorCode.TIMEOUT, message, True


def _outcome(
    ctx: Context, ending: Ending, begin: float, memory_start: int, started_at: str, instance_id: str, trace: str = ""
) -> Outcome:
    """The attempt's outcome: its result as stored, begun at `begin` (monotonic) and ending now;
    `trace`: the traceback of what the function raised."""
    status, value, code, message, retryable = ending
    completed = status == ExecutionStatus.COMPLETED
    metrics = {"result_omitted": message} if completed and message else {"traceback": trace} if trace else {}
    return Outcome(
        StoredResult(
            status=status,
            result=value if completed else None,
            error_code=code,
            # what the function raised, as it can be stored (probe19: a 20 MB message was lost
            # with the event it could not fit in, and counted as the worker's loss)
            error_message="" if completed else bounded_text(message, MAX_ERROR_CHARS),
            metrics=metrics,
            execution_time_ms=int((time.monotonic() - begin) * 1000),
            memory_used_bytes=memory.used(memory_start),
            started_at=started_at,
            completed_at=contract.format_timestamp(time.time()),
            attempt=ctx.attempt,
            instance_id=instance_id,
        ),
        retryable,
    )


async def _guarded(call: Awaitable[Any], running: Running) -> Any:
    """The function's call, with a KeyboardInterrupt, SystemExit or CancelledError it raises (in
    any thread or child process: they come back here) made an ordinary failure of the function.
    Left as they are, asyncio would stop the event loop on the first two: the worker, or with an
    inline function the whole `spear up`, would exit, and the execution be run again and again;
    and a CancelledError no one asked for would end the attempt CANCELLED (probe41). When it
    ended is noted in `running` (what its time limit is held to)."""
    try:
        return await call
    except (KeyboardInterrupt, SystemExit) as exc:
        raise ReportedFailure(exception_text(exc)) from None
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the attempt is stopped: a cancel, its time limit, or the worker stopping
        # Raised by the function itself (one of its own tasks cancelled, say), with no one asking:
        # a failure of the function, retried as one, not a cancellation (probe41).
        raise ReportedFailure(exception_text(exc)) from None
    finally:
        running.returned_at = time.monotonic()


def _classify(exc: BaseException | None, value: Any, max_result_bytes: int) -> Ending:
    """(status, value, error_code, error_message, retryable) of a finished function: what it
    raised, else its value."""
    if exc is None:
        if isinstance(value, StreamedItems) and value.overflowed:  # (see below: its items are not kept)
            note = (
                f"the {value.yielded} items (over {value.limit} bytes as JSON) are more than an event can carry: "
                "they are the execution's chunks"
            )
            return ExecutionStatus.COMPLETED, None, "", note, False
        try:
            size = len(encode_storable(value))
        except JsonRejected as error:  # stored as something else (inf as null), or not at all
            message = f"the result cannot be stored as JSON: {error}"
            return ExecutionStatus.FAILED, None, ErrorCode.RESULT_NOT_SERIALIZABLE, message, False
        if size > max_result_bytes and isinstance(value, StreamedItems):
            # Every item is stored already, each a chunk: the stream succeeded (probe19: 20 chunks
            # of 1 MiB, all delivered, then FAILED), only the list of them is left out.
            note = (
                f"the {value.yielded} items ({size} bytes as JSON) are more than an event can carry: "
                "they are the execution's chunks"
            )
            return ExecutionStatus.COMPLETED, None, "", note, False
        if size > max_result_bytes:  # it could not be stored: fail now rather than retry forever
            # (named like the exceptions FUNCTION_ERROR names, as a chunk too large is: ChunkTooLarge)
            message = (
                f"ResultTooLarge: the result is {size} bytes as JSON,"
                f" more than the {max_result_bytes} an event can carry"
            )
            return ExecutionStatus.FAILED, None, ErrorCode.FUNCTION_ERROR, message, False
        return ExecutionStatus.COMPLETED, value, "", "", False
    if isinstance(exc, ExecutionCancelled):
        return ExecutionStatus.CANCELLED, None, ErrorCode.CANCELLED, str(exc), False
    if isinstance(exc, ReportedFailure):
        return ExecutionStatus.FAILED, None, exc.error_code, str(exc), exc.retryable
    if isinstance(exc, ResultNotSerializable):
        return ExecutionStatus.FAILED, None, ErrorCode.RESULT_NOT_SERIALIZABLE, str(exc), False
    if isinstance(exc, InvalidArgument):
        return ExecutionStatus.FAILED, None, ErrorCode.INVALID_ARGUMENT, str(exc), False
    message = exception_text(exc)  # (its str() may raise: probe19 saw the worker fail on it, 5 runs)
    return ExecutionStatus.FAILED, None, ErrorCode.FUNCTION_ERROR, message, not isinstance(exc, NonRetryableError)
