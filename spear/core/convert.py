"""Translations between what is stored (events, ExecutionState) and what the API says, in one place.

The stored structs mirror the API's field for field today, so a result or a context converts by
attributes; when the two diverge, this module is what changes.
"""

from __future__ import annotations

import msgspec

from spear.core.contract import ExecutionContext, ExecutionInfo, ExecutionResult
from spear.core.events import StoredContext, StoredResult
from spear.core.state import ExecutionState


def api_result(stored: StoredResult) -> ExecutionResult:
    """A stored result as the API reports it (metrics as strings, SPEAR's map<string, string>)."""
    if any(not isinstance(value, str) for value in stored.metrics.values()):
        stored = msgspec.structs.replace(stored, metrics={k: str(v) for k, v in stored.metrics.items()})
    return msgspec.convert(stored, ExecutionResult, from_attributes=True)


def stored_context(context: ExecutionContext) -> StoredContext:
    """A request's context as the `requested` event stores it."""
    return msgspec.convert(context, StoredContext, from_attributes=True)


def execution_result(state: ExecutionState) -> ExecutionResult:
    """What a status query reports: the terminal result, or the progress so far."""
    if state.result is not None:
        return api_result(state.result)
    # SPEAR's `metrics` is a map of strings: a protobuf client decodes "0.5" into a string or a
    # double map alike, a bare number only into the latter.
    metrics = (
        {} if state.progress is None else {"progress": repr(state.progress), "progress_message": state.progress_message}
    )
    return ExecutionResult(
        status=state.status,
        started_at=state.started_at,
        attempt=state.attempt,
        error_message=state.last_error,
        metrics=metrics,
    )


def execution_info(state: ExecutionState) -> ExecutionInfo:
    """An execution's summary for status, list and task replies."""
    result = state.result
    return ExecutionInfo(
        execution_id=state.execution_id,
        task_id=state.task_id,
        function_name=state.function_name,
        execution_mode=state.execution_mode,
        status=state.status,
        started_at=state.started_at,
        completed_at=state.completed_at,
        execution_time_ms=result.execution_time_ms if result else 0,
        memory_used_bytes=result.memory_used_bytes if result else 0,
        # between attempts: the failed attempt's error, as in the status's result (error_code
        # stays empty until the execution itself fails)
        error_message=result.error_message if result else state.last_error,
        requested_at=state.requested_at,
        attempt=state.attempt,
        max_retries=state.max_retries,
        timeout_ms=state.timeout_ms,
        worker_id=state.worker_id,
    )
