"""The projection: folds every stored event into ExecutionState in the state bucket (KV), plus
per-function execution times for estimates.

Each state keeps the stream sequence it has applied, so a redelivered event is a no-op, and
writes are compare-and-set on the KV revision, so two projections never lose each other's
updates. The bucket is a cache of the log: `rebuild()` throws it away and replays the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import OrderedDict

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service as MicroService
from opentelemetry.trace import SpanKind

from spear import __version__
from spear.aio import quietly
from spear.core import contract
from spear.core.config import Settings
from spear.core.enums import ErrorCode
from spear.core.events import AnyEvent, BadEvent, Requested, Started, decode_event, is_terminal
from spear.core.names import Names
from spear.core.state import ExecutionState, apply, decode_state, encode_state
from spear.jetstream import topology
from spear.jetstream.pull import PullConsumer
from spear.projection.retention import Retention
from spear.telemetry import metrics, tracing

log = logging.getLogger(__name__)

CACHE_SIZE = 50_000
BATCH = 256  # events folded together: one state write per execution per batch
RECENT_TIMES = 32
STALL_S = 10.0  # events waiting this long with none applied: health says the projection stalls
# A poison invocation ended this recently: health is `degraded` (someone sends what no worker can
# run, or a worker cannot process it); after that it stays a note in health's message.
POISON_RECENT_S = 600.0
RESTART_MIN_S, RESTART_MAX_S = 0.1, 30.0  # backoff between restarts of a failed loop


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
        self.consumer: PullConsumer | None = None
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.cache: OrderedDict[str, tuple[ExecutionState, int]] = OrderedDict()
        self.function_stats: dict[str, FunctionStats] = {}
        self._stats_to_write: set[str] = set()  # function stats changed in this batch
        self.applied_seq = 0
        self.born = time.time() - 1.0  # event times have millisecond precision: a little slack
        self._progress = asyncio.Condition()
        self._loop_task: asyncio.Task[None] | None = None
        self._in_batch = False
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
        busy = self.queue.qsize() > 0 or self._in_batch
        return ProjectionStatus(
            applied_seq=self.applied_seq,
            waiting=self.queue.qsize(),
            idle_s=round(loop.time() - self._last_progress, 3),
            stalled=busy and loop.time() - self._last_progress > STALL_S,
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
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        durable = await topology.ensure_projection_consumer(self.nc, self.names)
        self.kv = await self.nc.jetstream().key_value(self.names.state_bucket)
        self._last_progress = asyncio.get_running_loop().time()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self.consumer = PullConsumer(self.nc, self.names.stream, durable, self.queue.put_nowait, capacity=512)
        await self.consumer.start()
        self.retention = Retention(self.nc, self.kv, self.settings)
        self.retention.start()
        service = await add_service(
            self.nc, name=self.names.projection_service_name, version=__version__, description="spear projection"
        )
        await service.add_endpoint(
            name="status", subject=self.names.projection_status, handler=self._serve_status, queue_group=None
        )
        self.service = service

    async def stop(self) -> None:
        """Stop consuming; events not yet acknowledged are redelivered."""
        if self.retention:
            self.retention.stop()
        if self.consumer:
            await self.consumer.stop()
        if self._loop_task:
            self._loop_task.cancel()
        if self.service:
            await self.service.stop()

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

    async def _consume(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < BATCH:
                batch.append(self.queue.get_nowait())
            self._in_batch = True
            try:
                await self._project_batch(batch)
            finally:
                self._in_batch = False
                for _ in batch:
                    if self.consumer is not None:
                        self.consumer.done()
            async with self._progress:
                self.applied_seq = max(self.applied_seq, *(msg.metadata.sequence.stream for msg in batch))
                self._last_progress = asyncio.get_running_loop().time()
                self._progress.notify_all()

    async def _project_batch(self, batch: list[Msg]) -> None:
        """Fold what is waiting, one write per execution (its events in stream order), executions
        side by side; ack each event once its execution's state is stored. An event that cannot
        be read, or whose body disagrees with its subject, is skipped and recorded. One span per
        batch, linked to the invocations' traces (the projection is not part of any of them)."""
        links = tracing.links_to([msg.headers for msg in batch]) if tracing.may_record() else []
        attributes = {"messaging.operation.type": "process", "messaging.batch.message_count": len(batch)}
        with tracing.span(f"process {self.names.prefix}.exec.>", SpanKind.CONSUMER, None, attributes, links):
            await self._fold_batch(batch)
        metrics.record_projected(len(batch))

    async def _fold_batch(self, batch: list[Msg]) -> None:
        groups: dict[str, list[tuple[AnyEvent, int, Msg]]] = {}
        for msg in batch:
            try:
                event = decode_event(msg.data, msg.subject)
            except BadEvent as exc:
                self._skipped(msg, exc)
                await quietly(msg.ack())
                continue
            groups.setdefault(event.execution_id, []).append((event, msg.metadata.sequence.stream, msg))
        outcomes = await asyncio.gather(
            *(self._project(execution_id, events) for execution_id, events in groups.items()), return_exceptions=True
        )
        await self._write_function_stats()
        for events, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error(
                    "projection: events of %s not applied (%s); redelivery follows", events[0][0].execution_id, outcome
                )
            for _, _, msg in events:
                await quietly(msg.nak(delay=1.0) if isinstance(outcome, BaseException) else msg.ack())

    def _skipped(self, msg: Msg, exc: BadEvent) -> None:
        self.skipped_events += 1
        self.last_skipped = f"seq {msg.metadata.sequence.stream} on {msg.subject[:200]}: {exc}"[:500]
        log.error("projection: event skipped: %s", self.last_skipped)

    async def _project(self, execution_id: str, events: list[tuple[AnyEvent, int, Msg]]) -> None:
        key = self.names.state_key(execution_id)
        # An execution whose batch starts with its `requested` event is new, unless this is a
        # redelivery: its state is created without reading first (one round trip, not two, per
        # new execution; a replay is mostly new executions). If it exists after all, the create
        # fails and the state is read and folded as usual.
        assume_new = isinstance(events[0][0], Requested) and execution_id not in self.cache
        for _ in range(5):
            state, revision = (None, 0) if assume_new else await self._load(execution_id, key)
            assume_new = False
            new = state
            for event, seq, _ in events:
                new = apply(new, event, seq)
            if new is None or new is state:
                return
            try:
                if revision:
                    revision = await self._bucket().update(key, encode_state(new), last=revision)
                else:
                    revision = await self._bucket().create(key, encode_state(new))
            except KeyWrongLastSequenceError:
                self.cache.pop(execution_id, None)  # another projection wrote: reload, re-apply
                continue
            self._remember(execution_id, new, revision)
            if new.terminal and not (state is not None and state.terminal):
                self._note_poison(new)
                await self._record_time(new)
            self._measure(new, [event for event, _, _ in events])
            return
        raise RuntimeError(f"state of {execution_id} kept changing under this projection")

    def _note_poison(self, state: ExecutionState) -> None:
        if state.result is not None and state.result.error_code == ErrorCode.POISON_MESSAGE:
            self.poison_invocations += 1
            self.last_poison = f"{state.execution_id}: {state.result.error_message}"[:500]
            ended = contract.parse_timestamp(state.completed_at) if state.completed_at else time.time()
            self._last_poison_at = max(ended, self._last_poison_at or 0.0)

    def _measure(self, state: ExecutionState, events: list[AnyEvent]) -> None:
        """The execution metrics, from the events this projection folded. Events made before it
        started (a restart's backlog, a rebuild's replay) are folded but not counted again."""
        for event in events:
            if contract.parse_timestamp(event.at) < self.born:
                continue
            task_id, function_name = state.task_id, state.function_name
            if isinstance(event, Started) and event.attempt == 1 and state.requested_at:
                wait_ms = (contract.parse_timestamp(event.at) - contract.parse_timestamp(state.requested_at)) * 1000
                metrics.record_wait(task_id, function_name, wait_ms)
            result = getattr(event, "result", None)
            if result is not None:  # the end of an attempt: retrying, or terminal
                metrics.record_attempt(task_id, function_name, result.status)
                if is_terminal(event):
                    metrics.record_finished(
                        task_id, function_name, result.status, result.execution_time_ms, result.memory_used_bytes
                    )

    async def _load(self, execution_id: str, key: str) -> tuple[ExecutionState | None, int]:
        cached = self.cache.get(execution_id)
        if cached:
            self.cache.move_to_end(execution_id)
            return cached
        try:
            entry = await self._bucket().get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None, 0
        return decode_state(entry.value or b""), entry.revision or 0

    def _remember(self, execution_id: str, state: ExecutionState, revision: int) -> None:
        self.cache[execution_id] = (state, revision)
        self.cache.move_to_end(execution_id)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    async def _record_time(self, state: ExecutionState) -> None:
        requested_at = contract.timestamp_or_none(state.requested_at)
        completed_at = contract.timestamp_or_none(state.completed_at)
        if requested_at is None or completed_at is None:
            return
        total_ms = int((completed_at - requested_at) * 1000)
        key = self.names.function_stats_key(state.task_id, state.function_name)
        stats = self.function_stats.get(key)
        if stats is None:  # first time this process sees the function: continue the stored figures
            stats = self.function_stats[key] = await read_function_stats(self._bucket(), key)
        self._stats_to_write.add(key)
        stats.count += 1
        stats.recent_total_ms = _recent(stats.recent_total_ms, total_ms)
        if state.result is not None:
            stats.recent_run_ms = _recent(stats.recent_run_ms, state.result.execution_time_ms)
        if state.started_at and state.requested_at and state.attempt == 1:
            wait_s = contract.parse_timestamp(state.started_at) - contract.parse_timestamp(state.requested_at)
            stats.recent_wait_ms = _recent(stats.recent_wait_ms, int(wait_s * 1000))

    async def _write_function_stats(self) -> None:
        """One write per function per batch, however many of its executions ended in it."""
        keys, self._stats_to_write = self._stats_to_write, set()
        await asyncio.gather(*(self._bucket().put(key, msgspec.json.encode(self.function_stats[key])) for key in keys))

    def _bucket(self) -> KeyValue:
        if self.kv is None:
            raise RuntimeError("the projection has not started")
        return self.kv


def _recent(times: list[int], newest: int) -> list[int]:
    return [*times[-(RECENT_TIMES - 1) :], max(0, newest)]


async def read_function_stats(kv: KeyValue, key: str) -> FunctionStats:
    """A function's recent times from the state bucket (empty if none)."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return FunctionStats()
    return msgspec.json.decode(entry.value or b"{}", type=FunctionStats)


async def rebuild(nc: Client, settings: Settings) -> None:
    """Throw the read models away so the next projection start replays the whole stream."""
    names = Names(settings.subject_prefix)
    await topology.ensure_base(nc, names, settings.nats.stream_replicas)
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(names.stream, names.projection_consumer)
    await js.purge_stream(f"KV_{names.state_bucket}")
