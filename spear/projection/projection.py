"""The projection: folds every stored event into ExecutionState in the state bucket (KV), plus
per-function execution times for estimates.

Each state keeps the stream sequence it has applied, so a redelivered event is a no-op, and
writes are compare-and-set on the KV revision, so two projections never lose each other's
updates. Events are folded in batches (`intake.py`: an execution's events, held up to
`[projection] linger_ms`, make one write), every execution of a batch written at once
(`kvwrites.py`). The bucket is a cache of the log: `rebuild()` throws it away and replays the
stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque

import msgspec
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service as MicroService
from opentelemetry.trace import SpanKind

from spear import __version__
from spear.aio import quietly
from spear.core import contract
from spear.core.config import Settings
from spear.core.enums import ErrorCode, ExecutionStatus
from spear.core.events import AnyEvent, BadEvent, Cancelled, Released, Requested, Retrying, Started, is_terminal
from spear.core.names import Names
from spear.core.state import ExecutionState, apply, decode_state, encode_state
from spear.core.versions import semantic
from spear.jetstream import directget, headers, hpub, pongs, replies, topology, wireparser
from spear.jetstream.errors import UNREACHABLE
from spear.jetstream.kvwrites import KvWriter, NoBucketLeader, WrongRevision
from spear.jetstream.pull import Delivery, PullConsumer, ack_info, nak_payload
from spear.jetstream.store import JetStreamStore
from spear.projection import functiontimes
from spear.projection.functiontimes import FunctionTimes
from spear.projection.intake import Arrived, Intake
from spear.projection.replay import Replay
from spear.projection.retention import Retention
from spear.telemetry import metrics, tracing

log = logging.getLogger(__name__)

# States of executions that have not ended, kept with their revision so the next events are
# written without reading first. Ended executions never change, so they are not kept: the cache
# holds what is running, never more than this, whatever the number of executions.
CACHE_SIZE = 10_000
BATCH = 2048  # a batch closes at this many events: one state write per execution per batch
IN_HAND = 2 * BATCH  # events delivered and not yet acknowledged: the next batch gathers meanwhile
MAX_LINKS = 128  # trace links of one batch's span (OpenTelemetry keeps no more by default)
STALL_S = 10.0  # events waiting this long with none applied: health says the projection stalls
# A poison invocation ended this recently: health is `degraded` (someone sends what no worker can
# run, or a worker cannot process it); after that it stays a note in health's message.
POISON_RECENT_S = 600.0
RESTART_MIN_S, RESTART_MAX_S = 0.1, 30.0  # backoff between restarts of a failed loop
STOP_GRACE_S = 5.0  # at stop, how long the batch being applied has to finish
CONSUMER_CHECK_S = 5.0  # how often a projection checks that its consumer is still there (gone twice: replayed)


def _runs_after(event: AnyEvent | BadEvent, running: bool) -> bool:
    """Whether an attempt runs after `event`, given whether one ran before it."""
    if isinstance(event, Started):
        return True
    if isinstance(event, (Retrying, Released)) or is_terminal(event):  # type: ignore[arg-type]
        return False
    return running


def _said_not_applied(failed: dict[str, BaseException]) -> None:
    """One line per batch for the executions whose state could not be stored (verify60: 1,004
    ERROR lines, one per execution, while the state bucket's leader was elected): a WARNING when
    every failure is the bucket not answering for now, an ERROR otherwise."""
    execution_id, error = next(iter(failed.items()))
    passing = all(isinstance(e, (TimeoutError, NoBucketLeader, *UNREACHABLE)) for e in failed.values())
    log.log(
        logging.WARNING if passing else logging.ERROR,
        "projection: events of %d execution(s) not applied (%s: %s); redelivery follows",
        len(failed),
        execution_id,
        error,
    )


def _delivered_before(item: Arrived) -> bool:
    try:
        return ack_info(item.msg).num_delivered > 1
    except Exception:  # (not from the consumer: say it was, so it is not counted twice)
        return True


class ProjectionStatus(msgspec.Struct):
    """A projection's own account of itself, served at `P.projection.status` for health."""

    applied_seq: int = 0
    waiting: int = 0  # events received, not folded yet
    idle_s: float = 0.0  # since the last batch was applied
    stalled: bool = False  # events wait, and none was applied for STALL_S
    running: bool = True
    restarts: int = 0
    last_error: str = ""
    skipped_events: int = 0  # unreadable, or body and subject disagree
    last_skipped: str = ""
    poison_invocations: int = 0  # ended POISON_MESSAGE, seen by this projection since it started
    last_poison: str = ""
    last_poison_age_s: float | None = None  # since the newest poison invocation ended (None: never)


class Projection:
    """Folds every stored event into the state bucket, supervised and restartable."""

    def __init__(self, nc: Client, settings: Settings, names: Names | None = None):
        self.nc = nc
        self.settings = settings
        self.names = names or Names(settings.subject_prefix)  # `spear bench` replays into its own
        self.kv: KeyValue | None = None
        self.writer: KvWriter | None = None
        self.store: JetStreamStore | None = None  # reads an execution's history from the log
        self.consumer: PullConsumer | None = None
        self._followed_created = ""  # when the consumer followed was made ("": not known)
        self.intake = Intake(settings.projection.linger_ms / 1000, BATCH)
        self.cache: OrderedDict[str, tuple[ExecutionState, int]] = OrderedDict()
        self.function_times = FunctionTimes(self.names, settings.projection.stats_interval_ms / 1000)
        # A replay's ended executions per function: the last RECENT_TIMES, and how many before them
        self._replay_recent: dict[tuple[str, str], deque[ExecutionState]] = {}
        self._replay_counted: Counter[tuple[str, str]] = Counter()
        self.applied_seq = 0
        self.born_seq = 0  # the stream's last sequence when this projection started
        self._progress = asyncio.Condition()
        self._loop_task: asyncio.Task[None] | None = None
        self._consumer_watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_batch = False
        self._batch: list[Arrived] = []  # the batch being applied (handed back if stopped midway)
        self._batch_opened_at = 0.0  # (loop time) when its first event arrived
        self._last_progress = 0.0
        self.restarts = 0
        self.last_error = ""
        self.skipped_events = 0
        self.last_skipped = ""
        self.poison_invocations = 0
        self.last_poison = ""
        self._last_poison_at: float | None = None  # epoch seconds the newest one ended (a replay keeps its age)
        self.retention: Retention | None = None
        self.service: MicroService | None = None

    def status(self) -> ProjectionStatus:
        """What health reports: progress, stalls, restarts, what was skipped and poison seen."""
        loop = asyncio.get_running_loop()
        busy_since = self._busy_since()
        return ProjectionStatus(
            applied_seq=self.applied_seq,
            waiting=len(self.intake),
            idle_s=round(loop.time() - self._last_progress, 3),
            # (from when it got work: a quiet spell before is no stall; probe26 saw health
            # `degraded` for the events of any call after 10 s without one)
            stalled=busy_since is not None and loop.time() - max(self._last_progress, busy_since) > STALL_S,
            running=self._loop_task is not None and not self._loop_task.done(),
            restarts=self.restarts,
            last_error=self.last_error,
            skipped_events=self.skipped_events,
            last_skipped=self.last_skipped,
            poison_invocations=self.poison_invocations,
            last_poison=self.last_poison,
            last_poison_age_s=None if self._last_poison_at is None else round(time.time() - self._last_poison_at, 3),
        )

    async def start(self) -> None:
        """Apply the topology and start consuming and folding."""
        headers.install()  # every delivered event carries headers (a connection not made by `connect`)
        wireparser.install()  # the client's parser too, between two reads
        pongs.install()  # a flush given up on does not end its read loop
        replies.protect(self.names.prefix)  # answers never go where they would be stored
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        js = self.nc.jetstream()
        # Events stored before now were counted in the metrics by whoever folded them first.
        self.born_seq = (await js.stream_info(self.names.stream)).state.last_seq
        self.kv = await js.key_value(self.names.state_bucket)
        self.writer = KvWriter(self.nc, self.names.state_bucket, self.settings.nats.request_timeout_ms / 1000)
        await self.writer.start()
        self.store = JetStreamStore(self.nc, self.names, self.settings.nats.request_timeout_ms / 1000)
        self._last_progress = asyncio.get_running_loop().time()
        if await self._durable_created() is not None:
            await self._follow(0)
            log.info("projection: following the stream (from where its consumer stands)")
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._consumer_watch = asyncio.get_running_loop().create_task(self._watch_consumer())
        self.retention = Retention(self.nc, self.kv, self.settings)
        self.retention.start()
        service = await add_service(
            self.nc,
            name=self.names.projection_service_name,
            version=semantic(__version__),
            description="spear projection",
        )
        await service.add_endpoint(
            name="status", subject=self.names.projection_status, handler=self._serve_status, queue_group=None
        )
        self.service = service

    async def stop(self) -> None:
        """Stop consuming, with the events in hand applied: those received are folded at once
        (the linger cut short) within STOP_GRACE_S, and any left are handed back (nak). Left to
        the consumer's ack wait (then 30 s; a nak does not outlive a restart of nats-server, which
        `spear up` stops with it), a restarted spear listed executions that had ended as RUNNING
        meanwhile (probe26: the workers' last ends arrive just before the projection stops)."""
        self._stopping = True
        if self.retention:
            self.retention.stop()
        if self._consumer_watch:
            self._consumer_watch.cancel()
            await asyncio.wait({self._consumer_watch}, timeout=1.0)
        if self.consumer:
            await self.consumer.stop()
        if self._loop_task:
            self.intake.hurry()
            try:
                async with self._progress:  # (notified after each batch)
                    await asyncio.wait_for(
                        self._progress.wait_for(lambda: not self._in_batch and not self.intake.pending),
                        STOP_GRACE_S,
                    )
            except TimeoutError:
                log.warning("projection: stopping with events not applied; they are handed back")
            self._loop_task.cancel()
            # Bounded: Python 3.11's wait_for can swallow a cancellation that meets its result
            # (awaited without a bound, this stop hung under load with NATS just back).
            await asyncio.wait({self._loop_task}, timeout=1.0)
            self._loop_task.cancel()  # (again, for one swallowed: it waits for a batch that never comes)
        await self._hand_back()
        self.function_times.stop()
        if self.service:
            await self.service.stop()
        if self.writer:
            await self.writer.stop()

    def _busy_since(self) -> float | None:
        """When the oldest event in hand arrived (loop time; the start of a replay); None: none is."""
        if self._in_batch:
            return self._batch_opened_at
        return self.intake.opened_at if self.intake.pending else None

    async def _hand_back(self) -> None:
        """Nak every event received and not applied (some of a batch cut short may be acked
        already: JetStream ignores a nak of those)."""
        in_hand = [item.msg.reply for item in (*self._batch, *self.intake.pending)]
        self._batch, self.intake.pending = [], []
        if in_hand:
            await quietly(hpub.publish_many(self.nc, in_hand, nak_payload(None)))
            await quietly(self.nc.flush(timeout=1))

    async def wait(self, seq: int, timeout: float = 10.0) -> None:
        """Return once every event up to stream sequence `seq` is applied."""
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: self.applied_seq >= seq), timeout)

    async def _serve_status(self, request: Request) -> None:
        await request.respond(msgspec.json.encode(self.status()))

    async def _run(self) -> None:
        """The loop, supervised: a failure is logged, recorded for health and the loop restarts
        after a backoff; it never dies silently. Events of a failed batch are redelivered."""
        delay = RESTART_MIN_S
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("projection: loop failed; restarting in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(RESTART_MAX_S, delay * 2)

    async def _watch_consumer(self) -> None:
        """A consumer deleted under a running projection (by `spear projection --rebuild`, which
        may also fail after dropping it) left it folding nothing and saying nothing, health and
        lag unmoved (probe36). Once it is seen gone, the projection replays the stream into the
        bucket and follows a consumer made anew, as at a first start. Gone at two looks in a row:
        a replay is long where the stream is (a minute for millions of events), and one answer
        may be wrong (a cluster recovering its meta state: review38)."""
        missed = False
        while True:
            await asyncio.sleep(CONSUMER_CHECK_S)
            if self.consumer is None or not self.nc.is_connected:
                missed = False
                continue  # (replaying: the consumer comes after; disconnected: checked later)
            try:
                created = await self._durable_created()
            except Exception as exc:  # (unanswered now: checked again later)
                log.debug("projection: consumer not checked: %s", exc)
                continue
            gone = created is None
            # Made anew since it was followed (probe61: a rebuild makes it again 40 ms after it
            # dropped it, so it was never seen gone): as sure a sign as a consumer gone twice.
            anew = not gone and self._followed_created not in ("", created)
            if (gone and missed) or anew:
                await self._start_over()
            missed = gone and not missed

    async def _start_over(self) -> None:
        if self._stopping:
            return
        log.warning(
            "projection: its consumer %s was deleted (a rebuild?): replaying the stream, then following anew",
            self.names.projection_consumer,
        )
        self.restarts += 1
        self.last_error = "its consumer was deleted: the stream was replayed"
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.wait({self._loop_task}, timeout=STOP_GRACE_S)
            self._loop_task.cancel()  # (again, for one swallowed by a wait_for: see stop)
        # What the deleted consumer delivered is read again by the replay; the states kept may
        # have been dropped with the bucket's (a rebuild purges it).
        self.intake.pending.clear()
        self._batch = []
        self.cache.clear()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _durable_created(self) -> str | None:
        """When the durable consumer was made (None: there is none)."""
        try:
            info = await self.nc.jetstream().consumer_info(self.names.stream, self.names.projection_consumer)
        except NotFoundError:
            return None
        return str(info.created)

    async def _follow(self, start_seq: int) -> None:
        """Consume the durable consumer (made to start at `start_seq` if it does not exist)."""
        durable = await topology.ensure_projection_consumer(self.nc, self.names, start_seq)
        if self._stopping:  # (stop came during a replay: it stopped no consumer, none is to start)
            return
        try:  # (which consumer is followed: one made anew under it is a rebuild's)
            self._followed_created = await self._durable_created() or ""
        except Exception as exc:
            log.debug("projection: consumer not read: %s", exc)
            self._followed_created = ""
        self.consumer = PullConsumer(self.nc, self.names.stream, durable, self.intake.receive, capacity=IN_HAND)
        await self.consumer.start()

    async def _replay(self) -> None:
        """No durable consumer (a first start, or a rebuild): replay the stream into the bucket
        (`replay.py`), then the durable consumer goes on from the next sequence. A replay that
        fails is started again by the loop (no durable consumer yet), from the beginning."""
        timeout_s = self.settings.nats.request_timeout_ms / 1000
        replay = Replay(self.nc, self.names, self._settle, self._skipped_at, timeout_s)
        began = time.monotonic()
        log.info("projection: replaying the stream into the state bucket")
        self._in_batch, self._batch_opened_at = True, asyncio.get_running_loop().time()
        self._replay_recent.clear()
        self._replay_counted.clear()
        try:
            replayed = await replay.run()
        finally:
            self._in_batch = False
        for key, recent in self._replay_recent.items():
            for n, state in enumerate(recent):
                await self.function_times.record(self._bucket(), state, self._replay_counted[key] if n == 0 else 0)
        self.function_times.schedule(self._bucket())
        metrics.record_projected(replay.events)
        log.info(
            "projection: replayed %d events (up to stream sequence %d) in %.1f s; following the stream",
            replay.events,
            replayed,
            time.monotonic() - began,
        )
        await self._follow(replayed + 1 if replayed else 0)
        async with self._progress:
            self.applied_seq = max(self.applied_seq, replayed)
            self._last_progress = asyncio.get_running_loop().time()
            self._progress.notify_all()

    async def _settle(self, states: list[ExecutionState]) -> None:
        """Write each replayed state over what the bucket holds for it, unless that is as far
        along already or ended (a bucket not emptied, an interrupted replay, another projection).
        Creates first, without reading: a rebuild's bucket is empty."""
        todo = [(state, 0) for state in states]
        for _ in range(5):
            outcomes = await self._writer().write(
                [(self.names.state_key(state.execution_id), encode_state(state), rev) for state, rev in todo]
            )
            conflicts = []
            for (state, _), outcome in zip(todo, outcomes, strict=True):
                if isinstance(outcome, WrongRevision):
                    conflicts.append(state)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    await self._replayed(state, outcome)
            loaded = await asyncio.gather(*(self._read(state.execution_id) for state in conflicts))
            todo = []
            for state, (stored, revision) in zip(conflicts, loaded, strict=True):
                if stored is None or not (stored.terminal or stored.last_seq >= state.last_seq):
                    todo.append((state, revision))
                elif not stored.terminal:
                    self._remember(state.execution_id, stored, revision)
            self._last_progress = asyncio.get_running_loop().time()
            if not todo:
                return
        raise RuntimeError(f"states kept changing under the replay ({len(todo)} of them)")

    async def _replayed(self, state: ExecutionState, revision: int) -> None:
        if state.terminal:
            self._note_poison(state)
            # Stats keep the last RECENT_TIMES times: the others of a replay are only counted.
            key = (state.task_id, state.function_name)
            recent = self._replay_recent.setdefault(key, deque())
            recent.append(state)
            if len(recent) > functiontimes.RECENT_TIMES:
                recent.popleft()
                self._replay_counted[key] += 1
        else:
            self._remember(state.execution_id, state, revision)

    async def _consume(self) -> None:
        if self.consumer is None:
            await self._replay()
        while True:
            batch = self._batch = await self.intake.next_batch()
            self._in_batch, self._batch_opened_at = True, self.intake.opened_at
            try:
                await self._project_batch(batch)
            finally:
                self._in_batch = False
                if self.consumer is not None:
                    self.consumer.done(len(batch))
            self._batch = []  # (applied: kept only when cut short, for `stop` to hand back)
            async with self._progress:
                self.applied_seq = max(self.applied_seq, max(item.seq for item in batch))
                self._last_progress = asyncio.get_running_loop().time()
                self._progress.notify_all()

    async def _project_batch(self, batch: list[Arrived]) -> None:
        """Fold a batch: one write per execution (its events in stream order), all executions'
        writes at once; ack each event once its execution's state is stored. An event that cannot
        be read, or whose body disagrees with its subject, is skipped and recorded. One span per
        batch, linked to the invocations' traces (the projection is not part of any of them)."""
        links = tracing.links_to([item.msg.headers for item in batch[:MAX_LINKS]]) if tracing.may_record() else []
        attributes = {"messaging.operation.type": "process", "messaging.batch.message_count": len(batch)}
        with tracing.span(f"process {self.names.prefix}.exec.>", SpanKind.CONSUMER, None, attributes, links):
            await self._fold_batch(batch)
        metrics.record_projected(len(batch))

    async def _fold_batch(self, batch: list[Arrived]) -> None:
        groups: dict[str, list[Arrived]] = {}
        unreadable = []
        for item in batch:
            if isinstance(item.event, BadEvent):
                self._skipped(item, item.event)
                unreadable.append(item)
            else:
                groups.setdefault(item.event.execution_id, []).append(item)
        failed = await self._store(groups)
        self.function_times.schedule(self._bucket())
        done = [item.msg for item in unreadable]
        for execution_id, items in groups.items():
            if execution_id not in failed:
                done += [item.msg for item in items]
                continue
            for item in items:
                await quietly(item.msg.nak(delay=1.0))
        if failed:
            _said_not_applied(failed)
        await quietly(self._ack(done))

    async def _ack(self, done: list[Delivery]) -> None:
        """Acknowledge each message (the consumer's policy is explicit: one ack per event), all
        queued in one go."""
        await hpub.publish_many(self.nc, [msg.reply for msg in done], b"+ACK")

    def _skipped(self, item: Arrived, exc: BadEvent) -> None:
        self._skipped_at(item.seq, item.msg.subject, exc)

    def _skipped_at(self, seq: int, subject: str, exc: BadEvent) -> None:
        self.skipped_events += 1
        self.last_skipped = f"seq {seq} on {subject[:200]}: {exc}"[:500]
        log.error("projection: event skipped: %s", self.last_skipped)

    async def _store(self, groups: dict[str, list[Arrived]]) -> dict[str, BaseException]:
        """Fold and write each execution's events; the executions whose state could not be stored.

        An execution whose events here start with its `requested` and that is not cached is new,
        unless this is a redelivery: its state is created without reading first (a replay is
        mostly new executions). A write that finds another revision (a create that finds the key,
        another projection's write) reads the state and folds again."""
        failed: dict[str, BaseException] = {}
        todo = groups
        for attempt in range(5):
            bases = await self._bases(todo, assume_new=attempt == 0, failed=failed)
            planned: list[tuple[str, ExecutionState | None, int, ExecutionState]] = []
            for execution_id, (state, revision) in bases.items():
                new = state
                for item in todo[execution_id]:
                    new = apply(new, item.event, item.seq)  # type: ignore[arg-type]  # readable: grouped
                if new is not None and new is not state:
                    planned.append((execution_id, state, revision, new))
            outcomes = await self._writer().write(
                [(self.names.state_key(eid), encode_state(new), revision) for eid, _, revision, new in planned]
            )
            retry: dict[str, list[Arrived]] = {}
            for (execution_id, state, _, new), outcome in zip(planned, outcomes, strict=True):
                if isinstance(outcome, WrongRevision):  # another writer was first: read, fold again
                    self.cache.pop(execution_id, None)
                    retry[execution_id] = todo[execution_id]
                elif isinstance(outcome, BaseException):
                    self.cache.pop(execution_id, None)
                    failed[execution_id] = outcome
                else:
                    await self._stored(execution_id, state, new, outcome, todo[execution_id])
            if not retry:
                return failed
            todo = retry
        for execution_id in todo:
            failed[execution_id] = RuntimeError(f"state of {execution_id} kept changing under this projection")
        return failed

    async def _bases(
        self, todo: dict[str, list[Arrived]], assume_new: bool, failed: dict[str, BaseException]
    ) -> dict[str, tuple[ExecutionState | None, int]]:
        """Each execution's state before these events, with its revision (0: none stored)."""
        bases: dict[str, tuple[ExecutionState | None, int]] = {}
        to_read = []
        for execution_id, items in todo.items():
            cached = self.cache.get(execution_id)
            if cached is not None:
                self.cache.move_to_end(execution_id)
                bases[execution_id] = cached
            elif assume_new and isinstance(items[0].event, Requested):
                bases[execution_id] = (None, 0)
            else:
                to_read.append(execution_id)
        loaded = await asyncio.gather(
            *(self._load(execution_id, todo[execution_id][0]) for execution_id in to_read), return_exceptions=True
        )
        for execution_id, outcome in zip(to_read, loaded, strict=True):
            if isinstance(outcome, BaseException):
                failed[execution_id] = outcome
            else:
                bases[execution_id] = outcome
        return bases

    async def _stored(
        self, execution_id: str, state: ExecutionState | None, new: ExecutionState, revision: int, items: list[Arrived]
    ) -> None:
        """After a write: remember the state (unless it ended), note what ended, count new events."""
        if new.terminal:
            self.cache.pop(execution_id, None)
            if state is None or not state.terminal:
                self._note_poison(new)
                await self.function_times.record(self._bucket(), new)
        else:
            self._remember(execution_id, new, revision)
        running = state is not None and state.status == ExecutionStatus.RUNNING
        self._measure(new, items, state.last_seq if state is not None else 0, running)

    def _note_poison(self, state: ExecutionState) -> None:
        if state.result is not None and state.result.error_code == ErrorCode.POISON_MESSAGE:
            self.poison_invocations += 1
            self.last_poison = f"{state.execution_id}: {state.result.error_message}"[:500]
            ended = contract.parse_timestamp(state.completed_at) if state.completed_at else time.time()
            self._last_poison_at = max(ended, self._last_poison_at or 0.0)

    def _measure(self, state: ExecutionState, items: list[Arrived], applied_seq: int, running: bool) -> None:
        """The execution metrics, from the events this projection folded (those after
        `applied_seq`, each once: an event delivered again while its first delivery waited, a
        projection slower than the ack wait, is in the batch twice: review44), `running` telling
        whether an attempt ran before them. Of the events stored before it started, those
        delivered before may have been counted by the projection that folded them (and died
        before its acknowledgement): only their first deliveries count (probe36: the executions
        that ended while the projection was down were never counted)."""
        for item in items:
            if item.seq <= applied_seq or (item.seq <= self.born_seq and _delivered_before(item)):
                continue
            applied_seq = item.seq  # (items are in stream order: a copy comes at or under it)
            event = item.event
            was_running, running = running, _runs_after(event, running)
            task_id, function_name = state.task_id, state.function_name
            if isinstance(event, Started) and event.attempt == 1 and state.requested_at:
                wait_ms = (contract.parse_timestamp(event.at) - contract.parse_timestamp(state.requested_at)) * 1000
                metrics.record_wait(task_id, function_name, wait_ms)
            result = getattr(event, "result", None)
            if result is None:
                continue
            # The end of an attempt (retrying, or terminal), but for a cancel of an execution
            # waiting for one, which ended no attempt (probe42: counted as a CANCELLED one;
            # review46: also after a `retrying` or a `released`).
            if was_running or not isinstance(event, Cancelled):
                metrics.record_attempt(task_id, function_name, result.status, result.error_code)
            if is_terminal(event):  # type: ignore[arg-type]  # readable: grouped
                metrics.record_finished(
                    task_id, function_name, result.status, result.execution_time_ms, result.memory_used_bytes
                )

    async def _load(self, execution_id: str, first: Arrived) -> tuple[ExecutionState | None, int]:
        """The stored state and its revision, to fold `first` and the events after it onto."""
        state, revision = await self._read(execution_id)
        if state is None and not isinstance(first.event, Requested):
            # No state (no key, or the marker expiry left: an id used again), and this is not
            # the execution's first event: another projection on the same consumer may hold its
            # `requested` in a batch not written yet. Folded onto nothing, this event would be
            # lost from the bucket for good; the log has what came before it (or says there is no
            # `requested`: the fold then stays what it was). Written over the marker's revision.
            return await self._from_log(execution_id, first.seq), revision
        return state, revision

    async def _read(self, execution_id: str) -> tuple[ExecutionState | None, int]:
        """The stored state and its revision (None, 0: no key; None and a revision: a tombstone,
        which a new state is written over)."""
        key, timeout_s = self.names.state_key(execution_id), self.settings.nats.request_timeout_ms / 1000
        value, revision = await directget.kv_entry(self.nc, self.names.state_bucket, key, timeout_s)
        return (decode_state(value) if value is not None else None), revision

    async def _from_log(self, execution_id: str, before_seq: int) -> ExecutionState | None:
        """The fold of an execution's stored events before stream sequence `before_seq`."""
        state = None
        for stored in await self._log().history(execution_id):
            if stored.seq >= before_seq:
                break
            state = apply(state, stored.event, stored.seq)
        return state

    def _remember(self, execution_id: str, state: ExecutionState, revision: int) -> None:
        self.cache[execution_id] = (state, revision)
        self.cache.move_to_end(execution_id)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    def _bucket(self) -> KeyValue:
        if self.kv is None:
            raise RuntimeError("the projection has not started")
        return self.kv

    def _log(self) -> JetStreamStore:
        if self.store is None:
            raise RuntimeError("the projection has not started")
        return self.store

    def _writer(self) -> KvWriter:
        if self.writer is None:
            raise RuntimeError("the projection has not started")
        return self.writer


async def rebuild(nc: Client, settings: Settings) -> None:
    """Throw the read models away so the next projection start replays the whole stream: the
    states, the functions' times and the kept statistics answers. Expired markers stay: they
    record executions whose events retention removed, which no replay brings back (status says
    "expired", a list cursor naming one goes on where it was)."""
    names = Names(settings.subject_prefix)
    await topology.ensure_base(nc, names, settings.nats.stream_replicas)
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(names.stream, names.projection_consumer)
    bucket = names.state_bucket
    for keys in (names.state_key(">"), names.every_function_stats_key(), names.every_tally_key()):
        await js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{keys}")
