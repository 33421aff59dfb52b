"""Counts and statistics gathered one state at a time (`views.Tally`): the same figures a pass
over all the states at once gives, within a time window, the newest execution's status per task."""

import asyncio
import time

import pytest

from spear.core.contract import TaskInfo, timestamps
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import StoredResult
from spear.core.state import ExecutionState
from spear.service.views import (
    EXACT_BELOW_S,
    REUSE_FACTOR,
    STALE_FACTOR,
    STALE_FLOOR_S,
    Tally,
    TallyCache,
    decode_kept,
    encode_kept,
)


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


class _Scans:
    """A scan that takes `took` seconds of a clock the test moves, counting the scans made."""

    def __init__(self, took: float):
        self.now = 1000.0
        self.took = took
        self.made = 0
        self.gate: asyncio.Event | None = None  # set: scans wait for it (to hold one in flight)
        self.fail = False
        self.running = 0
        self.most_at_once = 0

    def clock(self) -> float:
        return self.now

    async def scan(self, hours: int) -> Tally:
        self.made += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)  # a moment in which another scan could start
        self.running -= 1
        self.now += self.took
        if self.fail:
            raise RuntimeError("the bucket could not be read")
        tally = Tally()
        tally.add(_state(self.made, f"hours{hours}", ExecutionStatus.COMPLETED, time.time(), ms=1))
        return tally


async def test_quick_scans_are_made_for_every_call_so_counts_are_exact_as_of_the_call():
    scans = _Scans(took=EXACT_BELOW_S / 2)
    cache = TallyCache(scans.scan, scans.clock)
    first, second = await cache.get(), await cache.get()
    assert scans.made == 2 and first is not second


async def test_a_slow_scan_is_reused_while_young_then_refreshed_behind_its_answer_then_waited_for():
    scans = _Scans(took=2.0)
    cache = TallyCache(scans.scan, scans.clock)
    first = await cache.get()
    scans.now += REUSE_FACTOR * 2.0 - 0.1
    assert await cache.get() is first and scans.made == 1  # fresh
    scans.now += 0.2
    assert await cache.get() is first  # stale: given at once, a new scan started behind it
    for _ in range(5):  # (the scan behind it runs)
        await asyncio.sleep(0)
    assert scans.made == 2
    second = await cache.get()
    assert second is not first and scans.made == 2  # the new one, fresh
    scans.now += max(STALE_FLOOR_S, STALE_FACTOR * 2.0) + 1
    third = await cache.get()  # too old to give: waited for
    assert third is not second and scans.made == 3
    assert (await cache.get(hours=1)).tasks.keys() == {"hours1"}  # each time window on its own
    assert scans.made == 4


async def test_callers_during_a_slow_scan_share_it_and_one_giving_up_ends_no_one_elses_wait():
    scans = _Scans(took=2.0)
    cache = TallyCache(scans.scan, scans.clock)
    await cache.get()
    scans.now += 1000  # too old to give now
    scans.gate = asyncio.Event()
    waits = [asyncio.create_task(cache.get()) for _ in range(5)]
    await asyncio.sleep(0)
    waits[0].cancel()  # its caller went away
    await asyncio.sleep(0)
    scans.gate.set()
    answers = await asyncio.gather(*waits[1:])
    assert scans.made == 2 and all(answer is answers[0] for answer in answers)


async def test_a_failed_scan_fails_its_callers_and_the_next_call_scans_again():
    scans = _Scans(took=2.0)
    cache = TallyCache(scans.scan, scans.clock)
    scans.fail = True
    with pytest.raises(RuntimeError, match="could not be read"):
        await cache.get()
    scans.fail = False
    assert (await cache.get()).total == 1 and scans.made == 2


async def test_callers_of_a_cold_cache_share_one_scan_and_scans_of_other_windows_wait_their_turn():
    scans = _Scans(took=30.0)  # a deployment too big for its first scan to fit a client's timeout
    cache = TallyCache(scans.scan, scans.clock)
    scans.gate = asyncio.Event()
    waits = [asyncio.create_task(cache.get()) for _ in range(10)]
    waits += [asyncio.create_task(cache.get(hours=h)) for h in (1, 2)]
    for _ in range(5):
        await asyncio.sleep(0)
    scans.gate.set()
    answers = await asyncio.gather(*waits)
    assert all(answer is answers[0] for answer in answers[:10])
    assert scans.made == 3 and scans.most_at_once == 1


class _Kept:
    """Where slow scans' answers are kept (the state bucket, in a gateway), on the scans' clock."""

    def __init__(self, scans: _Scans):
        self.scans = scans
        self.answers: dict[int, tuple[float, float, bytes]] = {}  # hours -> (kept at, took, JSON)
        self.fail = False

    async def keep(self, hours: int, took: float, tally: Tally) -> None:
        if self.fail:
            raise ConnectionError("the bucket could not be written")
        self.answers[hours] = (self.scans.now, took, encode_kept(tally, took, scanned_at=self.scans.now))

    async def recall(self, hours: int) -> tuple[float, float, Tally] | None:
        if self.fail:
            raise ConnectionError("the bucket could not be read")
        if hours not in self.answers:
            return None
        decoded = decode_kept(self.answers[hours][2])
        assert decoded is not None
        scanned_at, took, tally = decoded
        return self.scans.now - scanned_at, took, tally


async def test_a_slow_scans_answer_is_kept_and_a_cache_that_starts_later_gives_it_as_its_own():
    scans = _Scans(took=30.0)
    kept = _Kept(scans)
    first = await TallyCache(scans.scan, scans.clock, kept.keep, kept.recall).get()
    assert scans.made == 1 and set(kept.answers) == {0}

    scans.now += REUSE_FACTOR * 30.0 - 1  # a gateway started now: the kept answer is fresh
    later = TallyCache(scans.scan, scans.clock, kept.keep, kept.recall)
    answer = await later.get()
    assert scans.made == 1 and answer.tasks == first.tasks and answer.execution_stats() == first.execution_stats()

    scans.now += 2  # stale: given at once while a new scan runs behind it
    another = TallyCache(scans.scan, scans.clock, kept.keep, kept.recall)
    assert (await another.get()).tasks == first.tasks
    for _ in range(5):
        await asyncio.sleep(0)
    assert scans.made == 2

    scans.now += max(STALE_FLOOR_S, STALE_FACTOR * 30.0) + 1  # too old to give: waited for
    assert (await TallyCache(scans.scan, scans.clock, kept.keep, kept.recall).get()).tasks.keys() == {"hours0"}
    assert scans.made == 3


async def test_a_quick_scans_answer_is_not_kept_and_a_store_that_fails_costs_only_a_scan():
    scans = _Scans(took=EXACT_BELOW_S / 2)
    kept = _Kept(scans)
    await TallyCache(scans.scan, scans.clock, kept.keep, kept.recall).get()
    assert kept.answers == {}  # exact for every call anyway
    scans.took, kept.fail = 30.0, True
    cache = TallyCache(scans.scan, scans.clock, kept.keep, kept.recall)
    assert (await cache.get()).total == 1 and scans.made == 2 and kept.answers == {}


def test_a_kept_answer_reads_back_as_the_tally_it_was_and_anything_else_as_none():
    tally = Tally(since=100.0)
    now = time.time()
    for n, status in enumerate([ExecutionStatus.COMPLETED, ExecutionStatus.RUNNING, ExecutionStatus.FAILED]):
        tally.add(_state(n, f"t{n % 2}", status, now, ms=10 * n))
    decoded = decode_kept(encode_kept(tally, 31.5, scanned_at=now))
    assert decoded is not None
    scanned_at, took, back = decoded
    assert (scanned_at, took, back.since) == (now, 31.5, 100.0)
    assert (back.by_status, back.by_function, back.tasks, back.busy) == (
        tally.by_status,
        tally.by_function,
        tally.tasks,
        tally.busy,
    )
    assert back.execution_stats() == tally.execution_stats() and back.total == tally.total
    assert decode_kept(b'{"scanned_at": "soon"}') is None and decode_kept(b"\xff") is None


async def test_callers_of_a_cold_window_share_one_look_at_the_kept_answers():
    """A second caller arriving while the first looked for the kept answer started a scan of its
    own and waited for all of it (a review); now both wait for the one look, and get its answer."""
    scans = _Scans(took=30.0)
    kept = _Kept(scans)
    await TallyCache(scans.scan, scans.clock, kept.keep, kept.recall).get()  # an earlier gateway's scan
    gate = asyncio.Event()
    looks = 0

    async def slow_recall(hours: int) -> tuple[float, float, Tally] | None:
        nonlocal looks
        looks += 1
        await gate.wait()
        return await kept.recall(hours)

    later = TallyCache(scans.scan, scans.clock, kept.keep, slow_recall)
    callers = [asyncio.create_task(later.get()) for _ in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*callers)
    assert looks == 1 and scans.made == 1 and all(answer.total == 1 for answer in answers)
