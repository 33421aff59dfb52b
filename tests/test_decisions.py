"""Decisions of the worker and the service, against the in-memory EventStore (no server): what a
(re)delivered invocation leads to, cancelling pending and running executions, idempotent
re-invocation, and the in-memory store's own guards (the JetStream store's, in
test_store_and_topology.py)."""

import pytest

from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus
from spear.core.events import (
    Cancelled,
    CancelRequested,
    Completed,
    Logged,
    Requested,
    Retrying,
    Started,
    StoredResult,
    envelope,
)
from spear.core.eventstore import AppendConflict
from spear.core.memstore import MemoryEventStore
from spear.core.state import fold
from spear.service.writes import record_request, store_cancel
from spear.worker.plan import plan

AT = "2026-01-01T00:00:00.000Z"


def _requested(execution_id: str = "E1", max_retries: int = 1, value: int = 1) -> Requested:
    return Requested(
        execution_id=execution_id,
        task_id="demo",
        function_name="echo",
        at=AT,
        execution_mode=ExecutionMode.ASYNC,
        parameters={"value": value},
        max_retries=max_retries,
        fingerprint=f"fp-{value}",
    )


async def _stored(store: MemoryEventStore, *events) -> int:
    seq = 0
    for event in events:
        seq = (await store.append(event)).seq
    return seq


def _kinds(store: MemoryEventStore, execution_id: str = "E1") -> list[str]:
    return [stored.event.kind for stored in store.events.get(execution_id, [])]


# --- the worker: what a delivered invocation leads to ------------------------------------------


async def test_a_first_delivery_runs_attempt_one_and_writes_nothing_first():
    store, request = MemoryEventStore(), _requested()
    seq = await _stored(store, request)
    assert await plan(store.append, request, await store.last("E1")) == (1, seq)
    assert _kinds(store) == ["requested"]


async def test_a_redelivery_after_a_lost_worker_records_the_loss_then_runs_the_next_attempt():
    store, request = MemoryEventStore(), _requested(max_retries=1)
    await _stored(store, request, Started(**envelope(request, 1), worker_id="gone"))
    attempt, last_seq = await plan(store.append, request, await store.last("E1"))
    assert attempt == 2 and _kinds(store) == ["requested", "started", "retrying"]
    retrying = (await store.last("E1")).event
    assert isinstance(retrying, Retrying) and retrying.result.error_code == ErrorCode.WORKER_LOST
    assert last_seq == (await store.last("E1")).seq  # attempt 2 is fenced on the retrying event


async def test_a_lost_worker_with_no_attempt_left_fails_the_execution_worker_lost():
    store, request = MemoryEventStore(), _requested(max_retries=0)
    await _stored(store, request, Started(**envelope(request, 1), worker_id="gone"))
    assert await plan(store.append, request, await store.last("E1")) is None
    state = fold(await store.history("E1"))
    assert state.status == ExecutionStatus.FAILED and state.result.error_code == ErrorCode.WORKER_LOST


async def test_a_lost_attempt_s_result_says_when_it_started_and_how_long_it_ran_until_lost():
    """probe29: a WORKER_LOST result had `started_at` null and `execution_time_ms` 0 although the
    attempt had started; a subscriber to the terminal event alone could not tell."""
    store, request = MemoryEventStore(), _requested(max_retries=0)
    started = Started(**{**envelope(request, 1), "at": "2026-01-01T00:00:01.000Z"}, worker_id="gone")
    await _stored(store, request, started)
    assert await plan(store.append, request, await store.last("E1")) is None  # (last: the `started`)
    lost = (await store.last("E1")).event.result
    assert lost.started_at == started.at and lost.execution_time_ms > 0

    store, request = MemoryEventStore(), _requested(max_retries=1)  # it logged after its start
    logged = Logged(**envelope(request, 1), message="working")
    await _stored(store, request, started, logged)
    asked: list[int] = []

    async def started_at(attempt: int) -> str | None:
        asked.append(attempt)
        return started.at

    await plan(store.append, request, await store.last("E1"), started_at)
    retrying = (await store.last("E1")).event
    assert asked == [1] and retrying.result.started_at == started.at


async def test_a_redelivery_of_an_ended_execution_only_acknowledges():
    store, request = MemoryEventStore(), _requested()
    done = Completed(**envelope(request, 1), result=StoredResult(status=ExecutionStatus.COMPLETED, attempt=1))
    await _stored(store, request, Started(**envelope(request, 1)), done)
    assert await plan(store.append, request, await store.last("E1")) is None
    assert _kinds(store) == ["requested", "started", "completed"]


async def test_a_waiting_cancel_request_is_honoured_on_redelivery():
    store, request = MemoryEventStore(), _requested()
    ask = CancelRequested(**envelope(request, 1), reason="enough")
    await _stored(store, request, Started(**envelope(request, 1)), ask)
    assert await plan(store.append, request, await store.last("E1")) is None
    cancelled = (await store.last("E1")).event
    assert isinstance(cancelled, Cancelled) and cancelled.reason == "enough"
    assert cancelled.result.error_code == ErrorCode.CANCELLED


async def test_a_plan_from_a_stale_view_meets_a_conflict_and_writes_nothing():
    store, request = MemoryEventStore(), _requested(max_retries=3)
    await _stored(store, request, Started(**envelope(request, 1)))
    stale = await store.last("E1")
    await store.append(CancelRequested(**envelope(request, 1)), expect_last_seq=stale.seq)
    with pytest.raises(AppendConflict):
        await plan(store.append, request, stale)  # it would record a lost worker: the log moved
    assert _kinds(store) == ["requested", "started", "cancel_requested"]


async def test_a_cancel_asked_again_meanwhile_is_not_taken_for_an_end():
    """Planned from a view one cancel request behind, `cancelled` is refused; that refusal says
    "read again", never "it ended another way": nothing is settled with no end stored."""
    store, request = MemoryEventStore(), _requested()
    await _stored(store, request, Started(**envelope(request, 1)), CancelRequested(**envelope(request, 1)))
    behind = await store.last("E1")
    await store.append(CancelRequested(**envelope(request, 1), reason="again"), expect_last_seq=behind.seq)
    with pytest.raises(AppendConflict):
        await plan(store.append, request, behind)
    assert _kinds(store) == ["requested", "started", "cancel_requested", "cancel_requested"]
    assert await plan(store.append, request, await store.last("E1")) is None  # read again: settled
    assert _kinds(store)[-1] == "cancelled"


# --- the service: cancelling ---------------------------------------------------------------------


async def test_cancelling_a_pending_execution_ends_it_at_once():
    store, request = MemoryEventStore(), _requested()
    seq = await _stored(store, request)
    state = fold(await store.history("E1"))
    assert await store_cancel(store, state, seq, reason="", force=False) is True
    assert _kinds(store) == ["requested", "cancelled"]
    assert fold(await store.history("E1")).status == ExecutionStatus.CANCELLED


async def test_cancelling_a_running_execution_asks_its_worker_and_force_ends_it_too():
    store, request = MemoryEventStore(), _requested()
    seq = await _stored(store, request, Started(**envelope(request, 1)))
    running = fold(await store.history("E1"))
    assert await store_cancel(store, running, seq, reason="stop", force=False) is False
    assert _kinds(store) == ["requested", "started", "cancel_requested"]

    forced, other = MemoryEventStore(), _requested("E2")
    seq = await _stored(forced, other, Started(**envelope(other, 1)))
    state = fold(await forced.history("E2"))
    assert await store_cancel(forced, state, seq, reason="now", force=True) is True
    assert _kinds(forced, "E2") == ["requested", "started", "cancel_requested", "cancelled"]


async def test_a_forced_cancel_whose_worker_ends_it_first_is_still_a_cancel():
    """The worker, told by the `cancel_requested` just stored, stores its own `cancelled` before
    the service's: the force cancel succeeded (it was reported FAILED_PRECONDITION, "already ended")."""

    class WorkerFirst(MemoryEventStore):
        async def append(self, event, **options):  # type: ignore[no-untyped-def]
            appended = await super().append(event, **options)
            if isinstance(event, CancelRequested):  # the worker's answer lands first
                await super().append(Cancelled(**envelope(event, 1), result=_cancelled()), expect_last_seq=appended.seq)
            return appended

    store, request = WorkerFirst(), _requested()
    seq = await _stored(store, request, Started(**envelope(request, 1)))
    running = fold(await store.history("E1"))
    assert await store_cancel(store, running, seq, reason="now", force=True) is True
    assert _kinds(store) == ["requested", "started", "cancel_requested", "cancelled"]


def _cancelled() -> StoredResult:
    return StoredResult(status=ExecutionStatus.CANCELLED, error_code=ErrorCode.CANCELLED, attempt=1)


async def test_a_cancel_based_on_a_stale_view_writes_nothing():
    store, request = MemoryEventStore(), _requested()
    seq = await _stored(store, request)
    pending = fold(await store.history("E1"))
    await store.append(Started(**envelope(request, 1)), expect_last_seq=seq)  # a worker started it
    with pytest.raises(AppendConflict):
        await store_cancel(store, pending, seq, reason="", force=False)
    assert _kinds(store) == ["requested", "started"]


# --- the service: idempotent invocation ----------------------------------------------------------


async def test_the_same_request_again_joins_the_execution_and_stores_nothing():
    store = MemoryEventStore()
    assert await record_request(store, _requested(), client_chose_id=True) == 1  # new: stored at sequence 1
    again = await record_request(store, _requested(), client_chose_id=True)
    assert not isinstance(again, int) and again.execution_id == "E1"
    assert _kinds(store) == ["requested"]


async def test_a_different_request_under_a_used_id_is_already_exists():
    store = MemoryEventStore()
    await record_request(store, _requested(value=1), client_chose_id=True)
    with pytest.raises(ApiError) as refused:
        await record_request(store, _requested(value=2), client_chose_id=True)
    assert refused.value.code == ErrorCode.ALREADY_EXISTS
    assert _kinds(store) == ["requested"]


async def test_a_server_made_id_repeated_within_the_window_is_a_duplicate_not_a_second_execution():
    store = MemoryEventStore()
    assert await record_request(store, _requested(), client_chose_id=False) == 1
    assert not isinstance(await record_request(store, _requested(), client_chose_id=False), int)
    assert _kinds(store) == ["requested"]


# --- the in-memory store keeps the JetStream store's guards ------------------------------------


async def test_the_memory_store_dedupes_message_ids_before_checking_sequences():
    store, request = MemoryEventStore(), _requested()
    first = await store.append(request, expect_last_seq=0, msg_id="E1:requested")
    again = await store.append(request, expect_last_seq=0, msg_id="E1:requested")
    assert again == (first.seq, True)
    with pytest.raises(AppendConflict) as conflict:
        await store.append(request, expect_last_seq=0)
    assert conflict.value.last_seq == first.seq
    other = await store.append(_requested("E2"), expect_last_seq=0)
    assert other.seq == first.seq + 1  # one sequence across executions, as a stream's
    assert [s.seq for s in await store.history("E1", after_seq=0)] == [first.seq]


def test_every_end_of_an_attempt_has_a_message_id_a_second_store_of_it_is_deduplicated_by():
    """A `retrying` stored but not acknowledged (JetStream busy) and stored again comes back a
    duplicate, not a conflict read as "a newer attempt owns it" (the delivery then waited a whole
    ack_wait instead of its backoff)."""
    from spear.core.config import RetrySettings
    from spear.worker.attempt import Outcome, end_event

    request = _requested(max_retries=1)
    failed = StoredResult(status=ExecutionStatus.FAILED, error_code=ErrorCode.FUNCTION_ERROR, attempt=1)
    event, msg_id = end_event(request, Outcome(failed, True), RetrySettings())
    assert isinstance(event, Retrying) and msg_id == "E1:retrying:1"
    event, msg_id = end_event(request, Outcome(failed, False), RetrySettings())
    assert event.kind == "failed" and msg_id == "E1:terminal:1"


def test_a_retry_s_jitter_leaves_the_random_module_as_the_user_s_functions_left_it():
    """Functions run in the worker's process: one that seeds `random` for repeatable results must
    not have spear draw from the module's generator between its calls."""
    import random

    from spear.core.config import RetrySettings
    from spear.worker.attempt import Outcome, end_event

    failed = StoredResult(status=ExecutionStatus.FAILED, error_code=ErrorCode.FUNCTION_ERROR, attempt=1)
    random.seed(7)
    before = random.getstate()
    event, _ = end_event(_requested(max_retries=1), Outcome(failed, True), RetrySettings(jitter=0.5))
    assert isinstance(event, Retrying) and random.getstate() == before
