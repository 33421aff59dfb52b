"""Read models over the projection's state bucket: listing, per-task counts, statistics.

`scan_states` reads every execution's current state (batched direct gets over the bucket);
the rest are pure functions over those states. A scan costs O(executions retained), which the
retention window bounds; see docs/design.md. Lists do not scan: `listing` reads pages.
"""

from __future__ import annotations

import time
from collections import Counter

import msgspec
from nats.aio.client import Client

from spear.core import contract
from spear.core.contract import (
    ExecutionStats,
    TaskInfo,
)
from spear.core.enums import ExecutionStatus
from spear.core.state import ExecutionState, decode_state
from spear.jetstream import directget


async def scan_states(nc: Client, bucket: str, timeout: float = 5.0) -> list[ExecutionState]:
    """Every execution's current state: the bucket keeps one value per key, so reading its stream
    from the start (batched direct gets) reads exactly the current values and delete markers."""
    states: list[ExecutionState] = []
    async for msg in directget.read_all(nc, f"KV_{bucket}", f"$KV.{bucket}.exec.>", 0, timeout):
        state = state_of(msg)
        if state is not None:
            states.append(state)
    return states


def state_of(msg: directget.Found) -> ExecutionState | None:
    """The state a direct get of the bucket returned (None: a deleted key, or one unreadable)."""
    if not msg.data or "KV-Operation" in msg.headers:
        return None  # a deleted or purged key
    try:
        state = decode_state(msg.data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    # The key names the execution: a state that claims another one is never acted on (say, by
    # retention, which purges the execution it names).
    if msg.subject.rsplit(".", 1)[-1] != state.execution_id:
        return None
    return state


def with_execution_counts(task: TaskInfo, states: list[ExecutionState]) -> TaskInfo:
    """`task` with how many executions it has and the status of its newest."""
    mine = [s for s in states if s.task_id == task.task_id]
    last = max(mine, key=lambda s: s.requested_at or "", default=None)
    return msgspec.structs.replace(
        task, execution_count=len(mine), last_status=last.status if last else ExecutionStatus.UNKNOWN
    )


def execution_stats(states: list[ExecutionState]) -> ExecutionStats:
    """Counts by status, mean execution time and success rate of `states`."""
    by_status = Counter(s.status for s in states)
    finished = [s for s in states if s.terminal]
    times = [s.result.execution_time_ms for s in finished if s.result]
    completed = by_status[ExecutionStatus.COMPLETED]
    return ExecutionStats(
        running_executions=by_status[ExecutionStatus.RUNNING],
        pending_executions=by_status[ExecutionStatus.PENDING],
        completed_executions=completed,
        failed_executions=by_status[ExecutionStatus.FAILED] + by_status[ExecutionStatus.TIMEOUT],
        average_execution_time_ms=round(sum(times) / len(times), 3) if times else 0.0,
        success_rate_percent=round(100.0 * completed / len(finished), 2) if finished else 0.0,
        executions_by_function=dict(Counter(f"{s.task_id}.{s.function_name}" for s in states)),
    )


def within_hours(states: list[ExecutionState], hours: int, now: float | None = None) -> list[ExecutionState]:
    """The states requested in the last `hours` (0: all of them)."""
    if hours <= 0:
        return states
    since = (now or time.time()) - hours * 3600
    return [s for s in states if (contract.timestamp_or_none(s.requested_at) or 0.0) >= since]
