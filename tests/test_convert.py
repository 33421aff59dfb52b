"""Stored events keep the wire shape of the API's structs (CONTRACT §4: terminal events carry the
full ExecutionResult), and the conversions between the two lose nothing."""

import msgspec

from spear.core.contract import ExecutionContext, ExecutionResult
from spear.core.convert import api_result, execution_info, execution_result, stored_context
from spear.core.enums import ErrorCode, ExecutionMode, ExecutionStatus
from spear.core.events import StoredContext, StoredResult
from spear.core.state import ExecutionState


def test_the_stored_structs_carry_the_api_structs_fields_in_order():
    # When this fails, the API changed: decide whether storage follows (convert.py says how).
    # Storage may add fields of its own after them (a result's instance_id).
    api_fields = ExecutionResult.__struct_fields__
    assert StoredResult.__struct_fields__[: len(api_fields)] == api_fields
    assert StoredContext.__struct_fields__ == ExecutionContext.__struct_fields__


def test_a_result_converts_to_the_same_bytes_and_back():
    stored = StoredResult(
        status=ExecutionStatus.FAILED,
        result={"partial": [1, 2]},
        error_message="boom",
        error_code=ErrorCode.FUNCTION_ERROR,
        execution_time_ms=12,
        started_at="2026-01-01T00:00:00.000Z",
        completed_at="2026-01-01T00:00:00.012Z",
        attempt=2,
        metrics={"progress": "0.5"},  # strings, as the API reports them
    )
    api = api_result(stored)
    assert isinstance(api.status, ExecutionStatus)
    # a subscriber reading a terminal event's `result` as an ExecutionResult gets the same
    assert msgspec.json.decode(msgspec.json.encode(stored), type=ExecutionResult) == api
    assert msgspec.json.decode(msgspec.json.encode(api), type=StoredResult) == stored


def test_a_context_is_stored_as_given():
    context = ExecutionContext(timeout_ms=500, max_retries=1, user_id="u", headers={"x": "y"})
    assert msgspec.json.encode(stored_context(context)) == msgspec.json.encode(context)


def test_an_execution_waiting_to_retry_shows_the_failed_attempts_error_in_its_summary_too():
    state = _state(ExecutionStatus.PENDING, last_error="RuntimeError: boom")
    assert execution_result(state).error_message == execution_info(state).error_message == "RuntimeError: boom"
    assert execution_result(state).error_code == ""  # not failed (yet)


def test_metrics_are_strings_as_in_spears_map_of_strings():
    state = _state(ExecutionStatus.RUNNING, progress=0.5, progress_message="step 2 of 4")
    assert execution_result(state).metrics == {"progress": "0.5", "progress_message": "step 2 of 4"}
    stored = StoredResult(status=ExecutionStatus.COMPLETED, metrics={"rows": 12, "ratio": 0.25})
    assert api_result(stored).metrics == {"rows": "12", "ratio": "0.25"}


def _state(status: ExecutionStatus, **fields) -> ExecutionState:
    """An ASYNC execution of demo at its first attempt, in `status`."""
    return ExecutionState(
        execution_id="e1",
        task_id="demo",
        function_name="process",
        status=status,
        execution_mode=ExecutionMode.ASYNC,
        last_seq=3,
        attempt=1,
        **fields,
    )
