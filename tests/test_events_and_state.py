import msgspec
import pytest

from spear.core.convert import execution_result
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import (
    BadEvent,
    Completed,
    Failed,
    Requested,
    Started,
    StoredResult,
    decode_event,
    encode_event,
    is_terminal,
)
from spear.core.state import apply, decode_state, encode_state, fold

COMMON = dict(execution_id="E1", task_id="demo", function_name="echo", at="2026-01-01T00:00:00.000Z")


def requested():
    return Requested(**COMMON, execution_mode=ExecutionMode.ASYNC, parameters={"value": 1}, fingerprint="f")


def completed(attempt=1):
    result = StoredResult(
        status=ExecutionStatus.COMPLETED, result=1, attempt=attempt, completed_at="2026-01-01T00:00:01.000Z"
    )
    return Completed(**COMMON, attempt=attempt, result=result)


def test_events_carry_stable_explicit_tags_and_common_fields():
    data = msgspec.json.decode(encode_event(requested()))
    assert data["type"] == "requested"
    for field in ("execution_id", "task_id", "function_name", "at", "attempt"):
        assert field in data
    assert msgspec.json.decode(encode_event(Started(**COMMON, attempt=1)))["type"] == "started"
    assert msgspec.json.decode(encode_event(completed()))["type"] == "completed"


def test_decode_round_trips_every_kind():
    for event in (requested(), Started(**COMMON, attempt=1, worker_id="w"), completed()):
        assert decode_event(encode_event(event)) == event


def test_decode_rejects_unknown_kinds():
    with pytest.raises(BadEvent):
        decode_event(b'{"type": "exploded", "execution_id": "E1"}')


@pytest.mark.parametrize(
    "data",
    [b"garbage", b"", b'{"type": "completed", "x": "\xff"}', b"[" * 5000 + b"]" * 5000, b"\xff\xfe"],
)
def test_any_bytes_are_one_bad_event(data):
    with pytest.raises(BadEvent):
        decode_event(data)


def test_the_subject_is_the_authority():
    event = encode_event(requested())
    assert decode_event(event, "p.exec.demo.E1.requested").execution_id == "E1"
    for subject in ("p.exec.demo.E2.requested", "p.exec.other.E1.requested", "p.exec.demo.E1.completed", "E1"):
        with pytest.raises(BadEvent):
            decode_event(event, subject)


def test_fold_walks_pending_running_completed():
    state = apply(None, requested(), 1)
    assert state.status == ExecutionStatus.PENDING
    state = apply(state, Started(**COMMON, attempt=1), 2)
    assert state.status == ExecutionStatus.RUNNING and state.attempt == 1
    state = apply(state, completed(), 3)
    assert state.status == ExecutionStatus.COMPLETED and state.terminal
    assert execution_result(state).result == 1


def test_reapplying_an_event_changes_nothing():
    state = fold([(requested(), 1), (Started(**COMMON, attempt=1), 2)])
    assert apply(state, Started(**COMMON, attempt=1), 2) is state
    assert apply(state, requested(), 1) is state


def test_terminal_state_is_final():
    state = fold([(requested(), 1), (completed(), 3)])
    failed = Failed(**COMMON, attempt=2, result=StoredResult(status=ExecutionStatus.FAILED, attempt=2))
    assert apply(state, failed, 9) is state
    assert apply(state, Started(**COMMON, attempt=2), 10).status == ExecutionStatus.COMPLETED


def test_history_without_its_requested_event_is_unknown():
    assert apply(None, Started(**COMMON, attempt=1), 2) is None


def test_state_round_trips_through_the_bucket_encoding():
    state = fold([(requested(), 1), (completed(), 2)])
    assert decode_state(encode_state(state)) == state
    assert is_terminal(completed()) and not is_terminal(requested())
