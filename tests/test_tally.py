"""Counts and statistics gathered one state at a time (`views.Tally`): the same figures a pass
over all the states at once gives, within a time window, the newest execution's status per task."""

import time

from spear.core.contract import TaskInfo, timestamps
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import StoredResult
from spear.core.state import ExecutionState
from spear.service.views import Tally


def _state(n: int, task: str, status: ExecutionStatus, requested_at: float, ms: int = 0) -> ExecutionState:
    result = StoredResult(status=status, execution_time_ms=ms) if status.terminal else None
    return ExecutionState(
        execution_id=f"e{n}",
        task_id=task,
        function_name="f" if n % 2 else "g",
        status=status,
        execution_mode=ExecutionMode.ASYNC,
        last_seq=n,
        requested_at=timestamps.format_timestamp(requested_at),
        result=result,
    )


def test_a_tally_counts_each_status_task_and_function_and_averages_the_ended():
    now = time.time()
    states = [
        _state(1, "a", ExecutionStatus.COMPLETED, now - 50, ms=10),
        _state(2, "a", ExecutionStatus.FAILED, now - 40, ms=30),
        _state(3, "b", ExecutionStatus.RUNNING, now - 30),
        _state(4, "a", ExecutionStatus.TIMEOUT, now - 20, ms=50),
        _state(5, "b", ExecutionStatus.PENDING, now - 10),
        _state(6, "b", ExecutionStatus.COMPLETED, now - 7200, ms=1000),  # two hours ago
    ]
    counted = Tally()
    for state in states:
        counted.add(state)
    stats = counted.execution_stats()
    assert (stats.completed_executions, stats.failed_executions) == (2, 2)  # TIMEOUT counts as failed
    assert (stats.running_executions, stats.pending_executions) == (1, 1)
    assert stats.average_execution_time_ms == round((10 + 30 + 50 + 1000) / 4, 3)
    assert stats.success_rate_percent == 50.0
    assert stats.executions_by_function == {"a.f": 1, "a.g": 2, "b.f": 2, "b.g": 1}
    assert counted.total == 6 and counted.busy == {"b"}
    a = counted.with_counts(TaskInfo(task_id="a"))
    assert (a.execution_count, a.last_status) == (3, ExecutionStatus.TIMEOUT)  # its newest
    b = counted.with_counts(TaskInfo(task_id="b"))
    assert (b.execution_count, b.last_status) == (3, ExecutionStatus.PENDING)
    none = counted.with_counts(TaskInfo(task_id="c"))
    assert (none.execution_count, none.last_status) == (0, ExecutionStatus.UNKNOWN)

    lately = Tally(since=now - 3600)  # the last hour only
    for state in states:
        lately.add(state)
    assert lately.total == 5 and lately.with_counts(TaskInfo(task_id="b")).execution_count == 2
    assert lately.execution_stats().average_execution_time_ms == 30.0
