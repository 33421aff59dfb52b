"""One attempt of one execution: run the function under its time limit, let it be cancelled, and
describe the outcome as an ExecutionResult plus whether another attempt may help."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from spear.core import contract
from spear.core.enums import ErrorCode, ExecutionStatus
from spear.core.events import StoredResult
from spear.core.jsonlimits import JsonRejected, encode_storable
from spear.worker import memory
from spear.worker.context import (
    Context,
    ExecutionCancelled,
    InvalidArgument,
    NonRetryableError,
    ResultNotSerializable,
)
from spear.worker.inprocess import ChunkSink, run_function
from spear.worker.isolation import ProcessPool
from spear.worker.tasks import Function


@dataclass
class Outcome:
    """How an attempt ended, and whether another attempt may help."""

    result: StoredResult
    retryable: bool


class ReportedFailure(Exception):
    """A failure whose message is reported as it is (no exception type in front), with its own
    error code: a process artifact's stderr, a changed artifact."""

    error_code: ErrorCode = ErrorCode.FUNCTION_ERROR
    retryable: bool = True

    def __init__(self, message: str, error_code: ErrorCode | None = None, retryable: bool | None = None):
        super().__init__(message)
        if error_code is not None:
            self.error_code = error_code
        if retryable is not None:
            self.retryable = retryable


class Running:
    """A running attempt, as the worker's cancel listener sees it."""

    def __init__(self, ctx: Context, function: Function | None):
        self.ctx = ctx
        self.is_coroutine = function is not None and (function.is_coroutine or function.is_async_generator)
        self.task: asyncio.Future[Any] | None = None
        self.released = False  # handed back by a worker stopping cleanly: not a cancellation

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
    executor: Executor | None,
    max_result_bytes: int,
    sink: ChunkSink | None = None,
    processes: ProcessPool | None = None,
    stream: bool = False,
    instance_id: str = "",
) -> Outcome:
    """Run one attempt of `function` to its end: returned, raised, timed out or cancelled."""
    ctx = running.ctx
    begin = time.monotonic()
    memory_start = memory.baseline()
    status, value, code, message, retryable = ExecutionStatus.COMPLETED, None, "", "", False
    if function is None:
        status, code = ExecutionStatus.FAILED, ErrorCode.FUNCTION_NOT_FOUND
        message = f"task {ctx.task_id!r} has no function {ctx.function_name!r}"
    else:
        running.task = asyncio.ensure_future(run_function(function, parameters, ctx, executor, sink, processes, stream))
        done, _ = await asyncio.wait({running.task}, timeout=timeout_ms / 1000)
        if not done:
            running.cancel(force=True)
            status, code, retryable = ExecutionStatus.TIMEOUT, ErrorCode.TIMEOUT, True
            message = f"attempt {ctx.attempt} ran past its time limit of {timeout_ms} ms"
        elif running.task.cancelled() or (ctx.cancelled and running.task.exception() is not None):
            status, code, message = ExecutionStatus.CANCELLED, ErrorCode.CANCELLED, "cancelled while running"
        else:
            status, value, code, message, retryable = _classify(running.task, max_result_bytes)
    return Outcome(
        StoredResult(
            status=status,
            result=value if status == ExecutionStatus.COMPLETED else None,
            error_code=code,
            error_message=message,
            execution_time_ms=int((time.monotonic() - begin) * 1000),
            memory_used_bytes=memory.used(memory_start),
            started_at=started_at,
            completed_at=contract.format_timestamp(time.time()),
            attempt=ctx.attempt,
            instance_id=instance_id,
        ),
        retryable,
    )


def _classify(task: asyncio.Future[Any], max_result_bytes: int) -> tuple[ExecutionStatus, Any, str, str, bool]:
    """(status, value, error_code, error_message, retryable) of a finished function."""
    exc = task.exception()
    if exc is None:
        value = task.result()
        try:
            size = len(encode_storable(value))
        except JsonRejected as error:  # stored as something else (inf as null), or not at all
            message = f"the result cannot be stored as JSON: {error}"
            return ExecutionStatus.FAILED, None, ErrorCode.RESULT_NOT_SERIALIZABLE, message, False
        if size > max_result_bytes:  # it could not be stored: fail now rather than retry forever
            message = f"result is {size} bytes, more than the {max_result_bytes} an event can carry"
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
    message = f"{type(exc).__name__}: {exc}"
    return ExecutionStatus.FAILED, None, ErrorCode.FUNCTION_ERROR, message, not isinstance(exc, NonRetryableError)
