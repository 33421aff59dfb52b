"""Each function's recent times (end to end, run, first-attempt queue wait), kept by the
projection from the executions it sees end and written to the state bucket at most every
`[projection] stats_interval_ms`: the gateway's `estimated_completion_ms` reads them."""

from __future__ import annotations

import asyncio
import logging
import statistics

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from spear.core import contract
from spear.core.names import Names
from spear.core.state import ExecutionState

log = logging.getLogger(__name__)

RECENT_TIMES = 32


class FunctionStats(msgspec.Struct):
    """Recent times of one function's finished executions: end to end (queue wait included), the
    final attempt's run time, and the first attempt's queue wait (started - requested)."""

    count: int = 0
    recent_total_ms: list[int] = []
    recent_run_ms: list[int] = []
    recent_wait_ms: list[int] = []

    def median_run_ms(self) -> int:
        """The median run time of recent executions (0: none yet)."""
        return int(statistics.median(self.recent_run_ms)) if self.recent_run_ms else 0

    def median_wait_ms(self) -> int:
        """The median queue wait of recent first attempts (0: none yet)."""
        return int(statistics.median(self.recent_wait_ms)) if self.recent_wait_ms else 0


async def read_function_stats(kv: KeyValue, key: str) -> FunctionStats:
    """A function's recent times from the state bucket (empty if none)."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return FunctionStats()
    return msgspec.json.decode(entry.value or b"{}", type=FunctionStats)


class FunctionTimes:
    """The functions' stats a projection keeps, and their writes (one per function per interval)."""

    def __init__(self, names: Names, interval_s: float):
        self.names = names
        self.stats: dict[str, FunctionStats] = {}
        self._to_write: set[str] = set()  # changed since they were last written
        self._interval_s = interval_s
        self._written_at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def record(self, kv: KeyValue, state: ExecutionState, ended_before: int = 0) -> None:
        """Count an ended execution in its function's stats and keep its times (only the last
        RECENT_TIMES are kept: a replay passes those, and how many `ended_before` them)."""
        requested_at = contract.timestamp_or_none(state.requested_at)
        completed_at = contract.timestamp_or_none(state.completed_at)
        if requested_at is None or completed_at is None:
            return
        key = self.names.function_stats_key(state.task_id, state.function_name)
        stats = self.stats.get(key)
        if stats is None:  # first time this process sees the function: continue the stored figures
            stats = self.stats[key] = await read_function_stats(kv, key)
        self._to_write.add(key)
        stats.count += 1 + ended_before
        total_ms = int((completed_at - requested_at) * 1000)
        stats.recent_total_ms = _recent(stats.recent_total_ms, total_ms)
        if state.result is not None:
            stats.recent_run_ms = _recent(stats.recent_run_ms, state.result.execution_time_ms)
        if state.started_at and state.attempt == 1:
            wait_s = contract.parse_timestamp(state.started_at) - requested_at
            stats.recent_wait_ms = _recent(stats.recent_wait_ms, int(wait_s * 1000))

    def schedule(self, kv: KeyValue) -> None:
        """Function stats are written at most every interval, however many executions of the
        function end meanwhile (estimates need recent times, not every one)."""
        if self._to_write and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._write(kv))

    def stop(self) -> None:
        """No more writes (what is pending is lost: at most one interval's samples)."""
        if self._task:
            self._task.cancel()

    async def _write(self, kv: KeyValue) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._written_at + self._interval_s - loop.time()))
        keys, self._to_write = self._to_write, set()
        self._written_at = loop.time()
        writes = (kv.put(key, msgspec.json.encode(self.stats[key])) for key in keys)
        for key, outcome in zip(keys, await asyncio.gather(*writes, return_exceptions=True), strict=True):
            if isinstance(outcome, Exception):
                log.warning("projection: stats of %s not written (%s); next time", key, outcome)
                self._to_write.add(key)


def _recent(times: list[int], newest: int) -> list[int]:
    return [*times[-(RECENT_TIMES - 1) :], max(0, newest)]
