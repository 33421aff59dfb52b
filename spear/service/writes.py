"""The service's writes to the log, against any EventStore: recording an invocation once, and
what cancelling a live execution stores. `Service` adds validation, admission and waiting.
"""

from __future__ import annotations

from spear.core.enums import ApiError, ErrorCode, ExecutionStatus
from spear.core.events import CancelRequested, Requested, cancelled, envelope
from spear.core.eventstore import AppendConflict, EventStore, Stored
from spear.core.state import ExecutionState, fold


def requested_msg_id(execution_id: str) -> str:
    """The `Nats-Msg-Id` of an execution's `requested` event: a second append of it is a duplicate."""
    return f"{execution_id}:requested"


async def record_request(
    store: EventStore, event: Requested, client_chose_id: bool, headers: dict[str, str] | None = None
) -> ExecutionState | int:
    """Store the `requested` event once: its stream sequence if it is new. Else the execution
    already stored under its id, which this request joins if it is the same request (task,
    function, parameters); another request under that id is ALREADY_EXISTS. A client-chosen id
    is guarded beyond the dedupe window too (expected last sequence 0: the id has no event at all)."""
    try:
        appended = await store.append(
            event,
            expect_last_seq=0 if client_chose_id else None,
            msg_id=requested_msg_id(event.execution_id),
            headers=headers,
        )
        if not appended.duplicate:
            return appended.seq
    except AppendConflict:
        pass
    return joined(event, await store.history(event.execution_id))


def joined(event: Requested, history: list[Stored]) -> ExecutionState:
    """The execution stored under `event`'s id (its `history`), which `event` joins if it is the
    same request (task, function, parameters); ALREADY_EXISTS if it is another, unreadable, or
    gone (`history` empty, the id remembered by the stream's duplicate window)."""
    state = fold(history)
    if state is None and not history:  # a duplicate of a `requested` whose events are gone
        message = (
            f"execution_id {event.execution_id!r} was used by an execution whose history is gone (expired, "
            "or removed with its task); the id is free again once the stream's duplicate window "
            "(2 minutes as shipped) has passed since its first use"
        )
        raise ApiError(ErrorCode.ALREADY_EXISTS, message)
    if state is None:  # what is stored under this id cannot be read: it is not this request
        message = f"execution_id {event.execution_id!r} is already used, by an unreadable request"
        raise ApiError(ErrorCode.ALREADY_EXISTS, message)
    if (state.task_id, state.function_name, state.fingerprint) != (
        event.task_id,
        event.function_name,
        event.fingerprint,
    ):
        raise ApiError(
            ErrorCode.ALREADY_EXISTS, f"execution_id {event.execution_id!r} is already used by a different request"
        )
    return state


async def store_cancel(
    store: EventStore,
    state: ExecutionState,
    last_seq: int,
    reason: str,
    force: bool,
    headers: dict[str, str] | None = None,
) -> bool:
    """Store what cancelling the live execution `state` (last event at `last_seq`) takes. Running:
    a `cancel_requested` for its worker. Pending, or with `force`: `cancelled` at once. True if it
    is cancelled now; False if its worker has been asked. AppendConflict if it moved meanwhile.
    `headers` go with each event (the invocation's trace)."""
    env = envelope(state, state.attempt)
    if state.status == ExecutionStatus.RUNNING:
        ask = CancelRequested(**env, reason=reason, force=force)
        last_seq = (await store.append(ask, expect_last_seq=last_seq, headers=headers)).seq
    if state.status == ExecutionStatus.PENDING or force:
        try:
            await store.append(cancelled(env, reason, state.started_at), expect_last_seq=last_seq, headers=headers)
        except AppendConflict:
            # Running: its worker may have answered the `cancel_requested` just stored (with its own
            # `cancelled`) before this append; once that is stored, nothing else can end it.
            last = await store.last(state.execution_id) if state.status == ExecutionStatus.RUNNING else None
            if last is None or last.event.kind != "cancelled":
                raise
        return True
    return False
