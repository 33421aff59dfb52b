"""Read models over the projection's state bucket: per-task counts and statistics.

`each_state` reads every execution's current state (batched direct gets over the bucket), one at a
time; a `Tally` keeps of them only what counts and statistics need (memory O(tasks + functions),
not O(executions): a scan once held every state, ~300 B each, at once). A scan costs
O(executions retained) in time (~27 µs a state here, nearly all of it reading), which the
retention window bounds; `TallyCache` keeps a slow scan's answer for a while, so that polling
callers do not scan back to back. Lists do not scan: `listing` reads pages; see docs/design.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from nats.aio.client import Client

from spear.aio import detached
from spear.core import contract
from spear.core.contract import (
    ExecutionStats,
    TaskInfo,
)
from spear.core.enums import ExecutionStatus
from spear.core.state import ExecutionState, decode_state
from spear.jetstream import directget

log = logging.getLogger(__name__)


async def each_state(nc: Client, bucket: str, timeout: float = 5.0) -> AsyncIterator[ExecutionState]:
    """Every execution's current state: the bucket keeps one value per key, so reading its stream
    from the start (batched direct gets) reads exactly the current values and delete markers."""
    keys = f"$KV.{bucket}.exec."
    # Every entry, the few that are not states skipped here: the server reads twice as fast
    # without a subject filter to match (100,000 states: 2.3 s instead of 5.4).
    async for msg in directget.read_all(nc, f"KV_{bucket}", ">", 0, timeout):
        state = state_of(msg) if msg.subject.startswith(keys) else None
        if state is not None:
            yield state


async def scan_states(
    nc: Client, bucket: str, timeout: float = 5.0, keep: Callable[[ExecutionState], bool] = lambda _: True
) -> list[ExecutionState]:
    """The current states that `keep` says to keep (ask for few: they are held at once)."""
    return [state async for state in each_state(nc, bucket, timeout) if keep(state)]


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


class Tally:
    """Counts and statistics of executions, added one state at a time; only those requested
    since `since` (a Unix time; None: all) count."""

    def __init__(self, since: float | None = None):
        self.since = since
        self.by_status: Counter[str] = Counter()
        self.by_function: Counter[str] = Counter()
        self.finished = 0
        self.time_sum_ms = 0
        self.timed = 0
        self.tasks: dict[str, tuple[int, str, str]] = {}  # task -> (executions, newest requested_at, its status)
        self.busy: set[str] = set()  # tasks with an execution not ended

    def add(self, state: ExecutionState) -> None:
        """Count `state` in (if it falls in the window)."""
        if self.since is not None and (contract.timestamp_or_none(state.requested_at) or 0.0) < self.since:
            return
        self.by_status[state.status] += 1
        self.by_function[f"{state.task_id}.{state.function_name}"] += 1
        if state.terminal:
            self.finished += 1
            if state.result is not None:
                self.time_sum_ms += state.result.execution_time_ms
                self.timed += 1
        else:
            self.busy.add(state.task_id)
        count, newest, status = self.tasks.get(state.task_id, (0, "", ExecutionStatus.UNKNOWN.value))
        requested_at = state.requested_at or ""
        if count == 0 or requested_at > newest:
            newest, status = requested_at, state.status
        self.tasks[state.task_id] = (count + 1, newest, status)

    @property
    def total(self) -> int:
        """How many executions were counted."""
        return sum(self.by_status.values())

    def with_counts(self, task: TaskInfo) -> TaskInfo:
        """`task` with how many executions it has and the status of its newest."""
        count, _, status = self.tasks.get(task.task_id, (0, "", ExecutionStatus.UNKNOWN.value))
        return msgspec.structs.replace(task, execution_count=count, last_status=status)

    def execution_stats(self) -> ExecutionStats:
        """Counts by status, mean execution time and success rate."""
        completed = self.by_status[ExecutionStatus.COMPLETED]
        return ExecutionStats(
            running_executions=self.by_status[ExecutionStatus.RUNNING],
            pending_executions=self.by_status[ExecutionStatus.PENDING],
            completed_executions=completed,
            failed_executions=self.by_status[ExecutionStatus.FAILED] + self.by_status[ExecutionStatus.TIMEOUT],
            average_execution_time_ms=round(self.time_sum_ms / self.timed, 3) if self.timed else 0.0,
            success_rate_percent=round(100.0 * completed / self.finished, 2) if self.finished else 0.0,
            executions_by_function=dict(self.by_function),
        )


class KeptTally(msgspec.Struct, frozen=True):
    """A slow scan's tally as kept in the state bucket, so that a gateway that starts (or another
    gateway) answers from it rather than wait for a scan of its own."""

    scanned_at: float  # Unix time the scan ended
    took: float  # seconds the scan took
    since: float | None
    by_status: dict[str, int]
    by_function: dict[str, int]
    finished: int
    time_sum_ms: int
    timed: int
    tasks: dict[str, tuple[int, str, str]]
    busy: list[str]


def encode_kept(tally: Tally, took: float, scanned_at: float) -> bytes:
    """`tally` as a KeptTally's JSON."""
    return msgspec.json.encode(
        KeptTally(
            scanned_at=scanned_at,
            took=took,
            since=tally.since,
            by_status=dict(tally.by_status),
            by_function=dict(tally.by_function),
            finished=tally.finished,
            time_sum_ms=tally.time_sum_ms,
            timed=tally.timed,
            tasks=tally.tasks,
            busy=sorted(tally.busy),
        )
    )


def decode_kept(data: bytes) -> tuple[float, float, Tally] | None:
    """(scanned at, took, tally) of a KeptTally's JSON; None if it is not one (a newer or older
    version's, or damaged)."""
    try:
        kept = msgspec.json.decode(data, type=KeptTally)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    tally = Tally(kept.since)
    tally.by_status.update(kept.by_status)
    tally.by_function.update(kept.by_function)
    tally.finished, tally.time_sum_ms, tally.timed = kept.finished, kept.time_sum_ms, kept.timed
    tally.tasks = dict(kept.tasks)
    tally.busy = set(kept.busy)
    return kept.scanned_at, kept.took, tally


async def tally(nc: Client, bucket: str, timeout: float, hours: int = 0, now: float | None = None) -> Tally:
    """Every execution's state counted into a Tally: those requested in the last `hours` (0: all)."""
    counted = Tally(None if hours <= 0 else (now or time.time()) - hours * 3600)
    async for state in each_state(nc, bucket, timeout):
        counted.add(state)
    return counted


EXACT_BELOW_S = 0.1  # a scan this quick is made for every call: its answer is never reused
REUSE_FACTOR = 5  # a slower scan's answer is fresh while younger than this many times its duration
STALE_FACTOR = 20  # ... and given at once, while a new scan runs behind, up to this many times
STALE_FLOOR_S = 60.0  # ... or this many seconds, whichever is longer
WINDOWS_KEPT = 8  # answers kept for this many distinct time windows (`hours`)


class TallyCache:
    """Counts and statistics for many callers at the cost of few scans.

    A scan that takes under EXACT_BELOW_S (up to a few thousand executions) is made anew for every
    call: counts are exact as of the call. A slower one's answer is given as it is while younger
    than REUSE_FACTOR times the scan's duration; older, up to STALE_FACTOR times (at least
    STALE_FLOOR_S), it is still given at once while a new scan runs behind it; older still (or
    none yet), the caller waits for a new scan. Callers that wait share one scan, and scans run
    one at a time, whatever their window. So, for one window, at most a sixth of a gateway's time
    goes to scanning however often pages and scripts poll (callers naming ever new windows make a
    scan each, one after another), and with a million
    executions retained (~30 s a scan, more than a client's 10 s request timeout) only the first
    call waits for one: later ones are answered at once, with counts minutes old at worst."""

    def __init__(
        self,
        scan: Callable[[int], Awaitable[Tally]],
        clock: Callable[[], float] = time.monotonic,
        keep: Callable[[int, float, Tally], Awaitable[None]] | None = None,
        recall: Callable[[int], Awaitable[tuple[float, float, Tally] | None]] | None = None,
    ):
        """`keep(hours, took, tally)` stores a slow scan's answer where `recall(hours)` finds it
        again as (age in seconds, took, tally): in the state bucket, so that a gateway that has
        just started, or another one, answers from it as from its own (a scan of a million
        executions takes ~30 s, and only then could the first call after a restart be answered)."""
        self._scan = scan
        self._clock = clock
        self._keep = keep
        self._recall = recall
        self._recalls: dict[int, asyncio.Task[None]] = {}  # windows being looked for in the store
        self._answers: OrderedDict[int, tuple[float, float, Tally]] = OrderedDict()  # hours -> (ended, took, tally)
        self._scanning: dict[int, asyncio.Task[Tally]] = {}
        self._one_at_a_time = asyncio.Lock()  # scans of different windows too: each reads every state

    async def get(self, hours: int = 0) -> Tally:
        """The tally of the executions requested in the last `hours` (0: all)."""
        if hours not in self._answers and self._recall is not None:
            # Callers of a cold window share one look at the store (a second one once started a
            # scan of its own meanwhile, and waited for all of it: a review).
            recalling = self._recalls.get(hours)
            if recalling is None:
                recalling = self._recalls[hours] = detached(self._recall_kept(hours))
                recalling.add_done_callback(lambda _: self._recalls.pop(hours, None))
            await asyncio.shield(recalling)
        kept = self._answers.get(hours)
        slow = kept is not None and kept[1] >= EXACT_BELOW_S
        scanning = self._scanning.get(hours)
        if scanning is not None and scanning.done():  # ended; its callback has not run yet
            scanning = None
        if kept is not None and slow:
            ended, took, tally = kept
            age = self._clock() - ended
            if age < REUSE_FACTOR * took:
                return tally
            if age < max(STALE_FLOOR_S, STALE_FACTOR * took):
                if scanning is None:
                    self._start(hours)  # runs behind this answer
                return tally
        if scanning is None or (kept is not None and not slow):  # a quick scan's caller makes its own
            scanning = self._start(hours)
        # A task of its own: a caller that gives up (a closed connection) ends no one else's wait.
        return await asyncio.shield(scanning)

    def _start(self, hours: int) -> asyncio.Task[Tally]:
        task = detached(self._scan_and_keep(hours))
        self._scanning[hours] = task

        def forget(done: asyncio.Task[Tally]) -> None:
            if self._scanning.get(hours) is done:
                del self._scanning[hours]
            if not done.cancelled():
                done.exception()  # read here, so that a scan every caller gave up on logs nothing

        task.add_done_callback(forget)
        return task

    async def _scan_and_keep(self, hours: int) -> Tally:
        async with self._one_at_a_time:
            began = self._clock()
            tally = await self._scan(hours)
            ended = self._clock()
        self._remember(hours, ended, ended - began, tally)
        if self._keep is not None and ended - began >= EXACT_BELOW_S:
            try:
                await self._keep(hours, ended - began, tally)
            except Exception as exc:  # an answer not kept is scanned again by the next gateway
                log.warning("statistics: could not keep a scan's answer: %s", exc)
        return tally

    async def _recall_kept(self, hours: int) -> None:
        try:
            recalled = await self._recall(hours) if self._recall is not None else None
        except Exception as exc:  # as if none was kept: scanned
            log.warning("statistics: could not read a kept answer: %s", exc)
            return
        if recalled is not None and hours not in self._answers:
            age, took, tally = recalled
            self._remember(hours, self._clock() - max(0.0, age), took, tally)

    def _remember(self, hours: int, ended: float, took: float, tally: Tally) -> None:
        self._answers[hours] = (ended, took, tally)
        self._answers.move_to_end(hours)
        while len(self._answers) > WINDOWS_KEPT:
            self._answers.popitem(last=False)
