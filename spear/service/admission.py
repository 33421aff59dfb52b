"""Admission control: refuse work beyond the configured limits at once, before anything is written.

SYNC calls in flight are counted per gateway process (`sync_execution.max_concurrent_requests`).
The ASYNC queue of a task (bounded by `async_execution.max_queue_size`) is its worker consumer's
backlog (`num_pending`: invocations no worker has taken yet), read at most every QUEUE_REFRESH_S
and counted up locally in between. It is never taken below the invocations accepted here that
the consumer has not delivered (known by stream sequence: `num_pending` lags behind the
acknowledgements), and the calls admitted here are added while their append is on its way (one
per execution id) or went unanswered. Before any worker has served the task its consumer does
not exist: then every invocation of the task stored is waiting, and nats-server counts them.
Invocations cancelled while they waited (a `cancelled` stored, their `requested` not delivered
yet) count in neither: a figure that would refuse reads them from the log (cancelledwaiting.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import NamedTuple

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from spear.aio import SharedReads
from spear.core.config import Settings
from spear.core.enums import ApiError, ErrorCode
from spear.core.eventstore import StoreUnavailable
from spear.core.names import Names
from spear.jetstream import counting
from spear.jetstream.errors import UNREACHABLE, jetstream_busy
from spear.service.cancelledwaiting import CancelledWhileWaiting
from spear.telemetry import metrics

QUEUE_REFRESH_S = 0.1
# A figure older than this is not answered while a new read runs: it may be from a burst long
# drained (probe47: an invocation after a quiet 4 s was told 32 s, for the 32 of the burst before)
STALE_S = 1.0
MOST_HELD_FOR_S = 60.0  # the most invocations held at once is forgotten this long after it was seen
FRESH_S = 0.02  # a count read to refuse on serves the refusals of this long after it
RETRY_AFTER_S = 1  # what a refused caller is told to wait (a slot frees as a call ends, or a worker takes one)
UNDELIVERED_SLACK = 10_000  # sequences (and unanswered appends) kept beyond max_queue_size, at most: a bound on memory
UNCERTAIN_SETTLE_S = 1.0  # an append not answered counts until a read sent this long after it succeeds
IDLE_FORGET_S = 300.0  # a task not read for this long, nothing of it counted here, is forgotten
SWEEP_S = 60.0  # how often reads look for such tasks


class QueueDepth(NamedTuple):
    """A task's worker consumer as JetStream counts it."""

    waiting: int  # num_pending: invocations stored, not yet taken by a worker
    held: int  # num_ack_pending: taken by a worker, not finished (running, or waiting to retry); not `hold`
    consumer_exists: bool  # false until a worker has served the task once (then all stored wait)


class Admission:
    """The gateway's admission limits: SYNC calls in flight, and each task's ASYNC backlog."""

    def __init__(self, nc: Client, names: Names, settings: Settings):
        self.nc = nc
        self.js = nc.jetstream()
        self.names = names
        self.max_sync = settings.sync_execution.max_concurrent_requests
        self.max_queue = settings.async_execution.max_queue_size
        self.sync_in_flight = 0
        self._queues: dict[str, tuple[float, QueueDepth]] = {}  # task -> (when its read was asked for, depth)
        # task -> stream sequences of invocations accepted here that its consumer had not delivered
        # when last read (JetStream's `num_pending` lags behind the acknowledgements: these don't)
        self._undelivered: dict[str, deque[int]] = {}
        # task -> execution id -> calls admitted here whose append is not answered yet
        self._on_their_way: dict[str, dict[str, int]] = {}
        # task -> when appends admitted here went unanswered (JetStream did not say: maybe stored)
        self._uncertain: dict[str, deque[float]] = {}
        # task -> when a read of it last failed (NATS down or frozen: what nats-py held is sent after)
        self._read_failed_at: dict[str, float] = {}
        self._delivered: dict[str, int] = {}  # task -> its consumer's last delivered stream sequence, as read
        # task -> the most invocations its workers held at once lately, and since when (`parallel`)
        self._most_held: dict[str, tuple[int, float]] = {}
        self._swept_at = time.monotonic()
        self._reads: SharedReads[QueueDepth] = SharedReads()  # one consumer-info read at a time per task
        self._fresh_reads: SharedReads[QueueDepth] = SharedReads()  # ... and one fresh one, to refuse on
        self._fresh: dict[str, tuple[float, QueueDepth]] = {}  # task -> (when its read landed, depth)
        # per task, its undelivered invocations whose execution was cancelled meanwhile
        self._cancelled = CancelledWhileWaiting(nc, names, self.max_queue + UNDELIVERED_SLACK)

    def enter_sync(self) -> None:
        """Count a SYNC call in, or refuse it (RESOURCE_EXHAUSTED) at the limit."""
        if self.sync_in_flight >= self.max_sync:
            raise ApiError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{self.sync_in_flight} SYNC calls in flight: the limit is {self.max_sync}",
                retry_after_s=RETRY_AFTER_S,
            )
        self.sync_in_flight += 1

    def leave_sync(self) -> None:
        """Count a SYNC call out."""
        self.sync_in_flight -= 1

    async def check_queue(self, task_id: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an ASYNC invocation of a task whose backlog is full.

        The figure that accepts may be a cached one, counted up locally; one that would refuse
        is read again from JetStream first, as it counts now (a cached figure can be from before
        the queue drained). Calls admitted whose append is on its way count too (`hold`)."""
        try:
            backlog = await self._backlog(task_id) + self._held(task_id)
            if backlog >= self.max_queue and not self._reads_fail(task_id):
                backlog = await self._fresh_backlog(task_id) + self._held(task_id)
        except Exception as exc:
            if not isinstance(exc, UNREACHABLE) and not jetstream_busy(exc) and not isinstance(exc, StoreUnavailable):
                raise
            if self.depth_kept(task_id) is None:  # no figure to go by (review62: a queue's worth more)
                raise
            backlog = self._backlog_unread(task_id) + self._held(task_id)
        if backlog >= self.max_queue:
            raise ApiError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{backlog} invocations of task {task_id!r} wait for a worker or are being stored: "
                f"the limit is {self.max_queue}",
                retry_after_s=RETRY_AFTER_S,
            )

    def _backlog_unread(self, task_id: str) -> int:
        """The backlog when its consumer cannot be read (probe58: its leader's node lost, every
        ASYNC call was refused UNAVAILABLE for the 5-7 s of the election, naming no execution):
        the figure last read, never below the invocations accepted here since that the consumer
        had not delivered then, so a queue cannot fill past its limit with this gateway's calls
        (with no figure read, `check_queue` cannot judge, and refuses). The read is made again by
        the next call."""
        kept = self.depth_kept(task_id)
        delivered = self._delivered.get(task_id, 0)
        return max(kept.waiting if kept is not None else 0, self._still_waiting(task_id, delivered))

    def _reads_fail(self, task_id: str) -> bool:
        """Whether the task's last read failed (none succeeded since)."""
        return self._read_failed_at.get(task_id, 0.0) > self._queues.get(task_id, (0.0, None))[0]

    async def _fresh_backlog(self, task_id: str) -> int:
        """The task's backlog as JetStream counts it now: one read shared by the calls that would
        be refused at the same time (a full queue under load refuses many), and, when it says
        full by itself, reused for FRESH_S (each refusal a round trip to a saturated JetStream
        would add to its load; a figure full only with the calls held here is read again)."""
        read_at, depth = self._fresh.get(task_id, (0.0, None))
        # (only a count that refuses is reused: one that accepts would let the calls of the next
        # FRESH_S in, however many, past the limit)
        if depth is None or time.monotonic() - read_at > FRESH_S or depth.waiting < self.max_queue:
            depth = await self._fresh_reads.read(task_id, lambda: self._read(task_id, time.monotonic(), True))
            self._fresh[task_id] = (time.monotonic(), depth)
        # (and those accepted here since it was read, which its waiting callers did not see yet)
        return max(depth.waiting, self._still_waiting(task_id, self._delivered.get(task_id, 0), less_cancelled=True))

    def hold(self, task_id: str, execution_id: str) -> None:
        """Count an admitted ASYNC invocation whose append is on its way, until `release`: the
        calls admitted meanwhile see it (calls sent together against a full queue were all let
        in). Calls under one execution id count once: they store one invocation at most (a
        client retrying with its own id; probe24: 246 of 300 such calls refused, the queue
        empty). One stored whose acknowledgement is still on its way is also in a figure read
        meanwhile: counted twice until then, which errs on the full side, as `_read` does."""
        held = self._on_their_way.setdefault(task_id, {})
        held[execution_id] = held.get(execution_id, 0) + 1

    def release(self, task_id: str, execution_id: str, stored_at: int | None, unanswered: bool = False) -> None:
        """A held invocation is done with: into the backlog if its append was stored (at stream
        sequence `stored_at`); None: not stored, or not sent at all. `unanswered`: JetStream did
        not say, or its caller left while it was on its way (it may be stored, later even:
        nats-py holds what it could not send). It counts until a read sent a while after succeeds
        (probe25: each 5 s of a frozen nats-server let another queue's worth of calls in, 148
        stored for a limit of 50)."""
        held = self._on_their_way.get(task_id, {})
        left = held.get(execution_id, 0) - 1
        if left > 0:
            held[execution_id] = left
        else:
            held.pop(execution_id, None)
            if not held:
                self._on_their_way.pop(task_id, None)
        if stored_at is not None:
            self.accepted(task_id, stored_at)
        elif unanswered:
            uncertain = self._uncertain.setdefault(task_id, deque(maxlen=self.max_queue + UNDELIVERED_SLACK))
            uncertain.append(time.monotonic())

    async def _count(self, task_id: str, cancellations: bool) -> QueueDepth:
        """The task's queue as JetStream counts it, never below the invocations accepted here that
        its consumer has not delivered, less those cancelled while they waited (as last read; read
        anew with `cancellations` if the queue looks full without them)."""
        try:
            info = await self.js.consumer_info(self.names.stream, self.names.worker_consumer(task_id), timeout=2)
        except NotFoundError:  # no worker served the task yet (or its consumer was deleted): each one stored waits
            stored = await counting.count_matching(
                self.nc, self.names.stream, self.names.event(task_id, "*", "requested"), timeout=2
            )
            if self._delivered.pop(task_id, None) is not None:  # it had one: deleted, or the stream made anew
                # (what was kept of it means nothing now: review27; once, not at every read: review28;
                # the stored count includes every invocation accepted here)
                self._cancelled.forget(task_id)
                self._undelivered.pop(task_id, None)
            return await self._less_cancelled(task_id, QueueDepth(stored, 0, False), 0, cancellations)
        delivered = info.delivered.stream_seq if info.delivered and info.delivered.stream_seq else 0
        if delivered < self._delivered.get(task_id, 0):
            # The consumer or the stream was made anew (nats-server lost its store, an operator
            # deleted it): sequences start again from 1, and those kept here mean nothing now
            # (review20: one left at the head was never passed, and the task refused for good).
            self._undelivered.pop(task_id, None)
            self._cancelled.forget(task_id)
        self._delivered[task_id] = delivered
        depth = QueueDepth(info.num_pending or 0, info.num_ack_pending or 0, True)
        self._note_held(task_id, depth.held)
        return await self._less_cancelled(task_id, depth, delivered, cancellations)

    def _note_held(self, task_id: str, held: int) -> None:
        most, since = self._most_held.get(task_id, (0, 0.0))
        now = time.monotonic()
        if held >= most or now - since > MOST_HELD_FOR_S:
            self._most_held[task_id] = (held, now)

    def parallel(self, task_id: str, depth: QueueDepth) -> int:
        """How many of the task's invocations its workers run at once, as seen lately (at least
        1): what a queue ahead is shared among. The figure held at the moment is no guide when a
        burst has just come, before the workers took theirs (probe36: 64 sleeps of 3 s said 195 s
        to a worker that ran 16 at once: 15 s)."""
        most, since = self._most_held.get(task_id, (0, 0.0))
        lately = most if time.monotonic() - since <= MOST_HELD_FOR_S else 0
        return max(1, depth.held, lately)

    async def _less_cancelled(self, task_id: str, counted: QueueDepth, delivered: int, read: bool) -> QueueDepth:
        """`counted` (JetStream's figure) never below the invocations accepted here after stream
        sequence `delivered`; with `read` (the refusing path), less those cancelled while they
        waited, read now if the queue is full with them (probe29: cancelling a backlog made no
        room until a worker had passed it). Not on the other reads: what is kept of them is
        checked against the log by that read only (review28: a stream made anew, or retention,
        left them left out of a count that no longer had them)."""
        own = self._still_waiting(task_id, delivered)
        if not read or max(counted.waiting, own) + self._held(task_id) < self.max_queue:
            return counted._replace(waiting=max(counted.waiting, own))
        await self._cancelled.read(task_id, delivered)
        cancelled = self._cancelled.sequences(task_id, delivered)
        own = self._still_waiting(task_id, delivered, less_cancelled=True)
        return counted._replace(waiting=max(counted.waiting - len(cancelled), own))

    def _still_waiting(self, task_id: str, delivered: int, less_cancelled: bool = False) -> int:
        """How many invocations accepted here come after stream sequence `delivered` (with
        `less_cancelled`, not those cancelled meanwhile, as just read), forgetting the others from
        the head: a consumer delivers in stream order, and the sequences are kept in the order
        their appends were acknowledged, nearly the same."""
        undelivered = self._undelivered.get(task_id)
        if not undelivered:
            return 0
        while undelivered and undelivered[0] <= delivered:
            undelivered.popleft()
        cancelled = self._cancelled.sequences(task_id, delivered) if less_cancelled else ()
        if cancelled:  # (as just read: they wait for nothing)
            return sum(1 for seq in undelivered if seq not in cancelled)
        return len(undelivered)  # (one acknowledged out of order is forgotten a little later)

    def _held(self, task_id: str) -> int:
        """Calls admitted here not in a figure read: on their way, or unanswered."""
        return len(self._on_their_way.get(task_id, ())) + len(self._uncertain.get(task_id, ()))

    def _settle_uncertain(self, task_id: str, sent: float) -> None:
        """A read sent at `sent` succeeded: the appends unanswered well before it are in its count
        if they were stored at all. (Failures are the task's own: another task's reads failing,
        its consumer's leader being elected say, would keep this one's counted for ever.)"""
        if sent - self._read_failed_at.get(task_id, 0.0) < UNCERTAIN_SETTLE_S:
            return  # (NATS came back a moment ago: what nats-py held is being stored now: probe25)
        uncertain = self._uncertain.get(task_id)
        while uncertain and uncertain[0] < sent - UNCERTAIN_SETTLE_S:
            uncertain.popleft()

    def accepted(self, task_id: str, stored_at: int) -> None:
        """Count an accepted ASYNC invocation (stored at stream sequence `stored_at`) into the
        task's backlog: until its consumer delivers it, as far as reads can tell."""
        undelivered = self._undelivered.setdefault(task_id, deque(maxlen=self.max_queue + UNDELIVERED_SLACK))
        undelivered.append(stored_at)
        read_at, depth = self._queues.get(task_id, (0.0, QueueDepth(0, 0, False)))
        self._queues[task_id] = (read_at, depth._replace(waiting=depth.waiting + 1))

    def queue_open_now(self, task_id: str) -> bool:
        """Whether the figure at hand admits an ASYNC invocation of the task, without waiting
        (False: none is at hand, or it is full: `check_queue` reads it as it counts now)."""
        depth = self.depth_at_hand(task_id)
        return depth is not None and depth.waiting + self._held(task_id) < self.max_queue

    async def _backlog(self, task_id: str) -> int:
        return (await self.depth(task_id)).waiting

    async def depth(self, task_id: str, max_age_s: float = QUEUE_REFRESH_S) -> QueueDepth:
        """The task's queue, read from its worker consumer at most every `max_age_s` (and counted up
        locally in between); also what the queue gauges of /metrics show. Once read, a stale
        figure is answered at once while a new read runs for the next callers: no request waits
        for the server's count but the first."""
        at_hand = self.depth_at_hand(task_id, max_age_s)
        if at_hand is not None:
            return at_hand
        return await asyncio.shield(self._reads.start(task_id, lambda: self._read(task_id, time.monotonic())))

    async def depth_within(self, task_id: str, max_age_s: float) -> QueueDepth:
        """The task's queue as read at most `max_age_s` ago, waiting for a read if it is older
        (what a /metrics scrape shows: probe30 found the figure one scrape old)."""
        read_at, depth = self._queues.get(task_id, (0.0, None))
        now = time.monotonic()
        if depth is not None and now - read_at < max_age_s:
            return depth
        return await self._reads.read(task_id, lambda: self._read(task_id, now))

    def depth_kept(self, task_id: str) -> QueueDepth | None:
        """The task's queue figure kept, however old (None: never read): for a fallback when no
        read can be made."""
        return self._queues.get(task_id, (0.0, None))[1]

    def depth_at_hand(self, task_id: str, max_age_s: float = QUEUE_REFRESH_S) -> QueueDepth | None:
        """`depth()` without waiting: the figure kept, with a new read started if it is older
        than `max_age_s`; None when the caller must wait for that read (there is no figure yet,
        it is older than STALE_S, or `max_age_s` asks for one fresher than those answered between
        reads). While reads fail (a consumer's leader lost), the figure kept with this gateway's
        calls since (`_backlog_unread`), however old: each read would wait for its timeout."""
        read_at, depth = self._queues.get(task_id, (0.0, QueueDepth(0, 0, False)))
        now = time.monotonic()
        if now - read_at < max_age_s:
            return depth
        self._reads.start(task_id, lambda: self._read(task_id, now))
        if not read_at or max_age_s < QUEUE_REFRESH_S:
            return None
        if now - read_at < STALE_S:
            return depth
        if self._reads_fail(task_id):  # no call waits for a read that fails (each its timeout)
            return depth._replace(waiting=self._backlog_unread(task_id))
        return None

    async def _read(self, task_id: str, asked_at: float, cancellations: bool = False) -> QueueDepth:
        # JetStream's `num_pending` can lag behind the acknowledgements of the appends it counts
        # (a read said 3 waiting where 5 were stored and acknowledged before it was sent, and
        # calls sent together got in twice the limit). The invocations accepted here are known
        # by sequence: those after the last one the consumer delivered wait, whatever the count
        # says. Waiting is the larger of the two (others' invocations are in the server's only).
        sent = time.monotonic()
        try:
            depth = await self._count(task_id, cancellations)
        except Exception:
            self._read_failed_at[task_id] = time.monotonic()
            raise
        self._settle_uncertain(task_id, sent)
        # (a figure that left cancelled invocations out is the refusing path's own: kept for the
        # others, it would be used after what it left out was removed from the log: review28)
        left_out = cancellations and self._cancelled.sequences(task_id, self._delivered.get(task_id, 0))
        if not left_out and asked_at >= self._queues.get(task_id, (0.0, depth))[0]:  # (not over a later read)
            self._queues[task_id] = (asked_at, depth)
        metrics.record_queue_depth(task_id, depth.waiting, depth.held)
        if sent - self._swept_at > SWEEP_S:
            self._forget_idle(sent)
        return depth

    def _forget_idle(self, now: float) -> None:
        """Drop what is kept of the tasks not read for IDLE_FORGET_S with nothing counted here
        (review20: an entry per task ever called, never freed); a forgotten task's next call
        reads its queue first, as the first call ever did."""
        self._swept_at = now
        for task_id, (read_at, _) in list(self._queues.items()):
            if now - read_at < IDLE_FORGET_S or self._held(task_id) or self._undelivered.get(task_id):
                continue
            self._queues.pop(task_id, None)
            for kept in (
                self._fresh,
                self._undelivered,
                self._uncertain,
                self._read_failed_at,
                self._delivered,
            ):
                kept.pop(task_id, None)
            self._cancelled.forget(task_id)
