"""Properties of the fold over any sequence of events (hypothesis): a terminal state is final, the
applied sequence never goes down, re-applying is a no-op, and `next_step` stays in its table."""

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from spear.core.enums import ErrorCode, ExecutionMode, ExecutionStatus
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
    TimedOut,
    is_terminal,
)
from spear.core.state import NextStep, apply, fold, next_step

COMMON = {"execution_id": "E1", "task_id": "demo", "function_name": "echo", "at": "2026-01-01T00:00:00.000Z"}
ATTEMPTS = st.integers(min_value=0, max_value=5)
STATUS_OF = {
    Completed: ExecutionStatus.COMPLETED,
    Failed: ExecutionStatus.FAILED,
    TimedOut: ExecutionStatus.TIMEOUT,
    Cancelled: ExecutionStatus.CANCELLED,
}


def _terminal(kind: type, attempt: int) -> AnyEvent:
    result = StoredResult(status=STATUS_OF[kind], attempt=attempt, error_code=ErrorCode.FUNCTION_ERROR)
    event: AnyEvent = kind(**COMMON, attempt=attempt, result=result)
    return event


EVENTS = st.one_of(
    st.builds(lambda a: Requested(**COMMON, attempt=a, execution_mode=ExecutionMode.ASYNC), ATTEMPTS),
    st.builds(lambda a: Started(**COMMON, attempt=a, worker_id="w"), ATTEMPTS),
    st.builds(
        lambda a: Retrying(**COMMON, attempt=a, result=StoredResult(status=ExecutionStatus.FAILED, attempt=a)),
        ATTEMPTS,
    ),
    st.builds(
        lambda a, p: Logged(**COMMON, attempt=a, message="m", progress=p),
        ATTEMPTS,
        st.none() | st.floats(0, 1),
    ),
    st.builds(lambda a, s: Chunk(**COMMON, attempt=a, seq=s, data=s), ATTEMPTS, st.integers(0, 3)),
    st.builds(lambda a, f: CancelRequested(**COMMON, attempt=a, force=f), ATTEMPTS, st.booleans()),
    st.builds(lambda a: Released(**COMMON, attempt=a, worker_id="w"), ATTEMPTS),
    st.builds(_terminal, st.sampled_from(list(STATUS_OF)), ATTEMPTS),
)
# (event, sequence) pairs: sequences increase, with gaps (other executions' events) and repeats
# (a redelivered event) mixed in.
HISTORIES = st.lists(st.tuples(EVENTS, st.integers(min_value=0, max_value=3)), max_size=25).map(
    lambda items: _sequenced(items)
)
PROPERTIES = hsettings(max_examples=300, deadline=None, database=None)


def _sequenced(items: list[tuple[AnyEvent, int]]) -> list[tuple[AnyEvent, int]]:
    out: list[tuple[AnyEvent, int]] = []
    seq = 0
    for event, step in items:
        seq += step  # 0: the same sequence again, a redelivery
        out.append((event, max(seq, 1)))
    return out


@PROPERTIES
@given(HISTORIES)
def test_a_terminal_state_is_final(history):
    state = None
    for event, seq in history:
        before = state
        state = apply(state, event, seq)
        if before is not None and before.terminal:
            assert state is before


@PROPERTIES
@given(HISTORIES)
def test_the_applied_sequence_never_goes_down_and_reapplying_changes_nothing(history):
    state = None
    for event, seq in history:
        before = state
        state = apply(state, event, seq)
        if before is not None:
            assert state is not None and state.last_seq >= before.last_seq
            assert apply(state, event, seq) == state  # the same event again: a no-op


@PROPERTIES
@given(HISTORIES)
def test_replaying_a_whole_history_again_changes_nothing(history):
    state = fold(history)
    assert fold(history, state) == state  # every event redelivered: all already applied


@PROPERTIES
@given(st.none() | EVENTS, st.integers(min_value=0, max_value=4))
def test_next_step_stays_in_its_table(last, max_retries):
    step, attempt = next_step(last, max_retries)
    assert step in set(NextStep)
    if last is None or is_terminal(last):
        assert (step, attempt) == (NextStep.DONE, 0)
    elif isinstance(last, CancelRequested):
        assert step == NextStep.CANCEL and attempt >= 1
    elif isinstance(last, (Started, Logged, Chunk)):  # the attempt's worker was lost
        lost = NextStep.RETRY_LOST if last.attempt < max_retries + 1 else NextStep.FAIL_LOST
        assert (step, attempt) == (lost, last.attempt)
    elif isinstance(last, Released):  # handed back: the same attempt again
        assert (step, attempt) == (NextStep.START, last.attempt)
    else:
        assert step == NextStep.START and 1 <= attempt <= max(1, last.attempt + 1)
