"""The worker: takes `requested` events from its task's shared consumer, runs attempts and
appends what happened (`started`, `retrying`, then one terminal event), acknowledging an
invocation only once its terminal event is stored.

Every append names the sequence of the execution's last event the worker knows of, so a stale
worker can never add to an execution that moved on: two workers never run the same attempt, a
late result never follows a newer attempt, and there is never a second terminal event. What to
do with an invocation is decided from the execution's last stored event (`state.next_step`), so
redeliveries after crashes, retries and cancellations all take the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NotJSMessageError
from nats.js.errors import KeyWrongLastSequenceError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service as MicroService

from spear import __version__
from spear.aio import quietly
from spear.core import contract
from spear.core.config import STOP_GRACE_S, Settings
from spear.core.contract import TaskInfo
from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus
from spear.core.events import (
    BadEvent,
    Cancelled,
    CancelRequested,
    Chunk,
    Completed,
    Event,
    Failed,
    Logged,
    Released,
    Requested,
    Retrying,
    Started,
    StoredResult,
    TimedOut,
    decode_event,
    envelope,
    failure,
    is_terminal,
)
from spear.core.eventstore import AppendConflict, Appended, EventStore, Stored, StoreFull, StoreUnavailable
from spear.core.jsonlimits import exception_text
from spear.core.names import RAN_INLINE_HEADER, Names
from spear.core.state import NextStep, backoff_left_ms, next_step
from spear.core.taskevents import AnyTaskEvent, TaskRegistered
from spear.core.versions import semantic
from spear.jetstream import directget, replies, topology
from spear.jetstream.errors import UNREACHABLE
from spear.jetstream.hints import is_stored_hint
from spear.jetstream.pull import Delivery, PullConsumer, ack_info
from spear.jetstream.registrystore import RegistryFollower, RegistryStore
from spear.jetstream.store import JetStreamStore
from spear.telemetry import logs, tracing
from spear.worker import elsewhere
from spear.worker.appends import AttemptAppends
from spear.worker.attempt import JITTER, Outcome, Running, end_event, max_result_bytes, run_attempt
from spear.worker.context import Context, StreamedItems
from spear.worker.elsewhere import Elsewhere, answer
from spear.worker.firsts import FirstDeliveries
from spear.worker.isolation import ProcessPool
from spear.worker.opening import Opening
from spear.worker.pauses import PauseWatch
from spear.worker.plan import append_cancelled, plan
from spear.worker.quick import QuickAttempts, Report
from spear.worker.reaper import reaper
from spear.worker.registered import RegisteredTask, not_allowed
from spear.worker.settle import Settler
from spear.worker.tasks import Function, Task
from spear.worker.threads import FunctionThreads

log = logging.getLogger(__name__)

CONFLICT_RETRY_DELAY_S = 2.0
STORE_FULL_RETRY_DELAY_S = 5.0  # JetStream had no room: an invocation is offered again after this
FULL_SAID_EVERY_S = 30.0
# A delivered invocation's events are stored, but a read right after can miss them: on a
# replicated stream a follower's consumer may deliver before the leader, which answers the read,
# has applied the message. Read again this many times, this far apart, before handing it back.
STALE_READ_TRIES = 5
STALE_READ_PAUSE_S = 0.05
# How long a worker watches a gateway-run invocation's attempt being stored before the long
# hold-off: a few replicated appends' worth.
INLINE_SETTLE_TRIES = 10
INLINE_SETTLE_PAUSE_S = 0.05
MAX_REPLANS = 5
STOP_SIGNAL_WINDOW_S = 1.0  # how soon after a stop signal ended a function's process its worker's stop shows
STORE_PATIENCE_S = 60.0  # how long a worker keeps trying to store an attempt's end while JetStream is away
REGISTRY_REFRESH_S = 10.0  # a code task's registry entry is put again by its workers when unchanged this long
STALE_LOOKS = 3  # ... and one of another definition found unchanged at this many looks in a row is replaced
MAX_CANCELLED_LATELY = 65_536  # executions seen cancelled, kept until newer ones push them out
MAX_SUSPECTS = 10_000  # deliveries read in a pause's aftermath, remembered until handled (a bound)
ACK_WAIT_RECHECK_S = 30.0  # how often a worker checks that its consumers' ack_wait is still its own or more
MAX_REMEMBERED_FAILURES = 10_000
RELEASE_S = 5.0  # how long released attempts get to store `released` before they are abandoned
# A call of a function this worker's release of a code task lacks, which another live worker has
# (a rolling upgrade), is handed back for this long: another worker takes it (elsewhere.py).
HAND_ON_DELAY_S = 0.05
HAND_ON_MAX_DELAY_S = 0.25
MAX_HANDED_ON_SAID = 1_000


def _definition_of(value: bytes) -> bytes | None:
    """A registry entry's definition: its TaskInfo without `created_at` and `updated_at`, encoded as
    a worker encodes its own (None if it is not a TaskInfo)."""
    try:
        info = msgspec.json.decode(value, type=TaskInfo)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return msgspec.json.encode(msgspec.structs.replace(info, created_at=None, updated_at=None))


class Worker:
    """Runs the functions of its tasks for the invocations its task consumers deliver."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        tasks: list[Task],
        worker_id: str | None = None,
        store: EventStore | None = None,
    ):
        self.nc = nc
        self.settings = settings
        self.names = Names(settings.subject_prefix)
        self.tasks = {task.task_id: task for task in tasks}
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store: EventStore = store or JetStreamStore(nc, self.names, settings.nats.request_timeout_ms / 1000)
        # Gateway-run invocations' ends read in batches, from the stream (not from a store given)
        self._settler = Settler(nc, self.names, settings.nats.request_timeout_ms / 1000) if store is None else None
        self._firsts = FirstDeliveries()  # its floor set at start
        self._full_said_at = -FULL_SAID_EVERY_S
        self.threads = FunctionThreads(settings.worker.concurrency, on_change=self._fit_intake)
        # At most `concurrency` attempts run at once in all, whatever tasks they are of: a task's
        # consumer holds that many invocations, and those of a second task wait for a slot,
        # PENDING (probe28: they stored `started` and timed out waiting for a thread).
        self.slots = asyncio.Semaphore(settings.worker.concurrency)
        # A delivery can go stale only while it waits out an ack wait unread: a pause of half one
        # is what to watch for (pauses.py). The deliveries read in a pause's aftermath, by reply.
        self.pauses = PauseWatch(settings.worker.ack_wait_ms / 2000)
        self._suspects: set[str] = set()
        self.cancelled_lately: dict[str, None] = {}  # (ordered: the oldest goes first)
        self._reconnects = 0
        self._left_alone: dict[str, float] = {}  # execution id -> when a suspect delivery first left it
        # Child processes for functions with isolation="process" (killable), if any function has it.
        self.processes: ProcessPool | None = None
        if any(f.in_process(settings.worker.isolation) for task in tasks for f in task.functions.values()):
            self.processes = ProcessPool(settings.worker.concurrency)
        self.consumers: dict[str, PullConsumer] = {}  # task id -> its consumer
        self.registered: dict[str, RegisteredTask] = {}  # tasks registered at runtime, served now
        self.follower: RegistryFollower | None = None
        self._registry_changes: asyncio.Queue[AnyTaskEvent] = asyncio.Queue()
        self._background: list[asyncio.Task[None]] = []
        self.jobs: set[asyncio.Task[None]] = set()
        self.running: dict[str, Running] = {}  # execution id -> the attempt this worker runs
        self.holding: set[str] = set()  # executions whose attempt ran here and whose end is being stored
        self.service: MicroService | None = None
        self._subscriptions: list[Subscription] = []  # cancel requests; who has a function (elsewhere.py)
        self._stopped = False
        # What stops this worker's process at once while it waits for its running attempts, said
        # in its stop line: the CLI sets it from the signal that began the stop (`Lifetime`).
        self.stop_hint = ""
        self._holds_reaper = False  # (reaper.py)
        self._stopping = asyncio.Event()  # set with `_stopped`: attempts may wait for it
        self._failures: dict[str, int] = {}  # execution id -> deliveries in a row that failed here
        # How long an invocation a gateway ran waits for the gateway to store its attempt: longer
        # than the gateway's appends may take (each is bounded by the request timeout).
        self._inline_hold_off_s = 2 * settings.nats.request_timeout_ms / 1000 + CONFLICT_RETRY_DELAY_S
        # First attempts of inline functions run from the read loop (quick.py), on a JetStream store
        self.quick = (
            QuickAttempts(self, self.store, CONFLICT_RETRY_DELAY_S) if isinstance(self.store, JetStreamStore) else None
        )
        self.elsewhere = Elsewhere(nc, self.names.worker_functions)  # who has a function this worker lacks
        self.handed_on = 0  # calls handed back for a worker that has their function, ever
        self._handed_on_said: set[tuple[str, str]] = set()
        self._functions = answer({task_id: sorted(task.functions) for task_id, task in self.tasks.items()})

    async def start(self) -> None:
        """Apply the topology, register the tasks, and start taking invocations."""
        replies.protect(self.names.prefix)  # answers never go where they would be stored
        if not self._holds_reaper:  # (started with the first process group, ended by the last stop)
            self._holds_reaper = True
            reaper.hold()
        StreamedItems.limit = self.max_result_size()  # (what a result event carries, on this connection)
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        if self.quick is not None:
            await self.quick.prepare()
        if self.processes is not None:
            await self.processes.warm()  # before taking work: the first call does not wait for a start
        cancels = await self.nc.subscribe(self.names.event("*", "*", "cancel_requested"), cb=self._on_cancel_requested)
        self._subscriptions.append(cancels)
        cancelled = await self.nc.subscribe(self.names.event("*", "*", "cancelled"), cb=self._on_cancelled)
        self._subscriptions.append(cancelled)
        self._reconnects = self.nc.stats["reconnects"]
        if self.tasks:  # before they are registered: a worker asking finds every one that has a function
            self._subscriptions.append(await self.nc.subscribe(self.names.worker_functions, cb=self._say_functions))
        # What is stored now may have been handled before: planned from its last event (firsts.py)
        self._firsts.floor = (await self.nc.jetstream().stream_info(self.names.stream)).state.last_seq
        registry = await self.nc.jetstream().key_value(self.names.tasks_bucket)
        self._background.append(self.pauses.start())  # (before the first pull)
        for task in self.tasks.values():  # the newest worker's definition is the task's (a new release)
            try:
                await self._register(registry, task.task_id)
            except ServiceUnavailableError as exc:  # no room to store it (JetStream full): serve all the same
                log.warning(
                    "worker: task %s not registered now (%s); tried again at the registry's looks", task.task_id, exc
                )
            await self._consume(task.task_id)
        if self.settings.worker.ack_wait_ms < 2 * self.settings.nats.request_timeout_ms:
            log.warning(  # an append may take a whole request timeout: its delivery must outlast it
                "worker: ack_wait_ms (%d) is under twice nats.request_timeout_ms (%d): an attempt whose end"
                " takes that long to store may be redelivered and run again",
                self.settings.worker.ack_wait_ms,
                self.settings.nats.request_timeout_ms,
            )
        self._background.append(asyncio.get_running_loop().create_task(self._keep_ack_wait()))
        if self.tasks:
            self._background.append(asyncio.get_running_loop().create_task(self._keep_registered(registry)))
        if self.settings.worker.serve_registered:
            store = RegistryStore(self.nc, self.names, self.settings.nats.request_timeout_ms / 1000)
            self.follower = RegistryFollower(store, self._registry_changes.put_nowait)
            await self.follower.start()  # replays the registry: its events wait in the queue
            await self._apply_registry_changes()
            loop = asyncio.get_running_loop()
            self._background.append(loop.create_task(self._follow_registry()))
            self._background.append(loop.create_task(self._retire_idle_instances()))
        self.service = await add_service(
            self.nc,
            name=self.names.worker_service_name,
            version=semantic(__version__),
            description="spear worker",
            metadata={
                "worker_id": self.worker_id,
                "tasks": ",".join(self.tasks),
            },
        )
        # What it serves now (registered tasks come and go) and its live instances, for get_task;
        # a queue group of its own, so every worker answers.
        await self.service.add_endpoint(
            name="tasks",
            subject=self.names.worker_tasks,
            handler=self._describe,
            queue_group=f"w{uuid.uuid4().hex}",
        )
        await self.nc.flush()

    async def _consume(self, task_id: str) -> None:
        """Start taking the task's invocations from its shared consumer."""
        durable = await topology.ensure_worker_consumer(self.nc, self.names, task_id, self.settings.worker.ack_wait_ms)
        capacity = self.capacity
        ack_wait_s = self.settings.worker.ack_wait_ms / 1000
        # Heartbeats well within half an ack wait, so that a silence that long is a stall (pauses.py)
        consumer = PullConsumer(
            self.nc,
            self.names.stream,
            durable,
            None,
            capacity,
            heartbeat_s=min(1.0, ack_wait_s / 6),
            stall_s=ack_wait_s / 2,
        )
        consumer.on_delivery = lambda delivery: self._on_delivery(delivery, task_id, consumer)
        consumer.may_hand_back = lambda delivery: not self._suspect(consumer)
        await consumer.start()
        self.consumers[task_id] = consumer

    def _definition(self, task_id: str) -> bytes:
        """This worker's definition of a code task, as compared with the registry's entries."""
        return msgspec.json.encode(self.tasks[task_id].info())

    async def _register(self, registry: KeyValue, task_id: str) -> None:
        """Put this worker's definition of a code task in the registry, unless the entry holds it
        already (then it is refreshed, its `created_at` kept)."""
        value, revision = await directget.kv_entry(
            self.nc, self.names.tasks_bucket, task_id, self.settings.nats.request_timeout_ms / 1000
        )
        if value is not None and _definition_of(value) == self._definition(task_id):
            with contextlib.suppress(KeyWrongLastSequenceError):  # a peer wrote it meanwhile
                await registry.update(task_id, value, last=revision)
            return
        await registry.put(task_id, self._stamped(task_id))

    async def _keep_registered(self, registry: KeyValue) -> None:
        """Keep the registry's entry of each task served from code one that live workers serve.

        A worker puts its definition when it starts (`_register`): the newest release wins.
        Workers serving the definition the entry holds put it again (the same bytes, its
        `created_at` kept) once they have found it unchanged at a look, so it keeps changing
        while they live; an entry of another definition found unchanged at STALE_LOOKS looks in a
        row is one no live worker serves, and is replaced by this worker's. Looks that fail (NATS
        away) count for nothing, and every write is a compare-and-set on the revision looked at:
        after an outage the workers serving the entry refresh it at their first look, and an
        older release does not take it from under them. A probe started a second worker with
        other functions under the same task id and stopped it: the entry kept its definition
        for good, and gateways refused every call of the remaining workers' functions. A
        deleted entry is left deleted (delete_task)."""
        looks: dict[str, tuple[int, int]] = {}  # task -> (revision, looks in a row that found it unchanged)
        warned: set[tuple[str, bytes]] = set()  # (task, definition) said once: it is refreshed every round
        bucket, timeout = self.names.tasks_bucket, self.settings.nats.request_timeout_ms / 1000
        while True:
            await asyncio.sleep(JITTER.uniform(0.5, 1.0) * REGISTRY_REFRESH_S)  # workers spread out
            for task_id in self.tasks:
                try:
                    value, revision = await directget.kv_entry(self.nc, bucket, task_id, timeout)
                    seen, unchanged = looks.get(task_id, (-1, 0))
                    unchanged = unchanged + 1 if revision == seen else 0
                    looks[task_id] = (revision, unchanged)
                    if value is None:
                        continue  # deleted, or never written: not this worker's to bring back
                    definition = _definition_of(value)
                    if definition == self._definition(task_id):
                        if unchanged >= 1:
                            await registry.update(task_id, value, last=revision)  # still served
                    elif unchanged >= STALE_LOOKS:
                        log.warning(
                            "worker: task %r: no worker serves its registered definition; now this one's", task_id
                        )
                        await registry.update(task_id, self._stamped(task_id), last=revision)
                    elif (task_id, definition or value) not in warned:
                        warned.add((task_id, definition or value))
                        log.warning(
                            "worker: task %r is registered with another definition (another worker's): calls that"
                            " fit only this worker's are refused while a worker serves that one",
                            task_id,
                        )
                except Exception as exc:  # NATS away, or another worker wrote first: the next look
                    log.debug("worker: registry entry of %r not kept: %s", task_id, exc)

    def _stamped(self, task_id: str) -> bytes:
        """This worker's definition as a new entry: `created_at` now."""
        info = msgspec.structs.replace(self.tasks[task_id].info(), created_at=contract.format_timestamp(time.time()))
        return msgspec.json.encode(info)

    def _fit_intake(self) -> None:
        """Take as many invocations as can start: fewer while functions that overran their
        attempts hold every spare thread (threads.py), so that others' workers take them."""
        for consumer in self.consumers.values():
            consumer.resize(self.capacity)

    async def _keep_ack_wait(self) -> None:
        """Raise a task consumer's `ack_wait` back to this worker's whenever it is found lower.

        Workers that start at the same instant with different `ack_wait_ms` can each read the
        consumer before the other writes it, and the lower value land last: this worker's beats
        (a third of its own value) would then come too late, and its long calls be redelivered
        and run twice. Read again a moment after the start (a random one, so that such workers
        do not race again), then every ACK_WAIT_RECHECK_S: the highest value wins within a second
        or two. (`ensure_worker_consumer` never lowers it; operations.md says how to.)"""
        await asyncio.sleep(JITTER.uniform(0.5, 1.5))
        own_ns = self.settings.worker.ack_wait_ms * 1_000_000
        while True:
            for task_id in list(self.consumers):
                name = self.names.worker_consumer(task_id)
                try:
                    info = await topology.api_request(self.nc, f"CONSUMER.INFO.{self.names.stream}.{name}", None, 5)
                    if int(info["config"].get("ack_wait", 0)) < own_ns:
                        log.warning("worker: consumer %s had a lower ack_wait than this worker's: raised again", name)
                        await topology.ensure_worker_consumer(
                            self.nc, self.names, task_id, self.settings.worker.ack_wait_ms
                        )
                except Exception as exc:  # NATS away for a while: the next round reads again
                    log.debug("worker: ack_wait of %s not checked: %s", name, exc)
            await asyncio.sleep(ACK_WAIT_RECHECK_S)

    # --- tasks registered at runtime -----------------------------------------------------------

    async def _follow_registry(self) -> None:
        while not self._stopped:
            await self._apply_registry_changes(block=True)

    async def _apply_registry_changes(self, block: bool = False) -> None:
        """Serve newly registered tasks, stop taking invocations of deleted ones, in event order.
        Not once the worker is stopping: its connection may be gone (a cancellation of this loop
        can be lost on Python 3.11, and it then went through the queue logging a failure for
        each event, seen as errors of other tests), and a worker started anew reads the registry."""
        while (block or not self._registry_changes.empty()) and not self._stopped:
            # Each task's last event alone, of those come together: the registry replayed at start
            # holds every task ever registered, and a deleted one was served (its consumer pulled
            # from) until its `deleted` was applied, at every start (probe36).
            latest = {(first := await self._registry_changes.get()).task_id: first}
            while not self._registry_changes.empty():
                event = self._registry_changes.get_nowait()
                latest.pop(event.task_id, None)  # (in the order of their last events)
                latest[event.task_id] = event
            block = False
            for event in latest.values():
                if self._stopped:
                    return
                try:
                    await self._apply_registry_change(event)
                except Exception:
                    if self._stopped:
                        return
                    log.exception("worker: registry event %s %s not applied", event.kind, event.task_id)

    async def _apply_registry_change(self, event: AnyTaskEvent) -> None:
        if event.task_id in self.tasks:
            return  # served from code here: that wins
        roots = self.settings.tasks.artifact_roots
        # (asked before the task is taken out: a delivery meanwhile still finds it, review43)
        refused = await asyncio.to_thread(not_allowed, event.task, roots) if isinstance(event, TaskRegistered) else None
        previous = self.registered.pop(event.task_id, None)
        if previous is not None:
            previous.retire()
        if isinstance(event, TaskRegistered) and refused is None:
            self.registered[event.task_id] = RegisteredTask(event.task, roots)
            if event.task_id not in self.consumers:
                await self._consume(event.task_id)
                log.info("worker: serving registered task %s", event.task_id)
            return
        consumer = self.consumers.pop(event.task_id, None)
        if consumer is not None:
            await consumer.stop()
        if refused is not None:
            # Its invocations wait for a worker allowed to run it (health names the task), rather
            # than each failing once stored (probe41: served, listed, and every call FAILED).
            log.warning("worker: registered task %s not served: %s", event.task_id, refused)
        elif consumer is not None:
            log.info("worker: task %s deleted; no longer served", event.task_id)

    async def _retire_idle_instances(self) -> None:
        idle_s = self.settings.tasks.instance_idle_s
        while True:
            await asyncio.sleep(min(5.0, max(0.05, idle_s / 4)))
            for task in list(self.registered.values()):
                task.retire_idle(idle_s)

    async def _describe(self, request: Request) -> None:
        served = sorted({*self.tasks, *self.registered})
        instances = {tid: t.instances(self.worker_id) for tid, t in self.registered.items() if t.instance}
        body = {
            "worker_id": self.worker_id,
            "tasks": served,
            "instances": instances,
            "running": list(self.running),
            "slots": self.capacity,  # (what an estimate shares a queue among)
        }
        await request.respond(msgspec.json.encode(body))

    async def _say_functions(self, msg: Msg) -> None:
        """Answer a worker that asks who has a function its release lacks (elsewhere.py): the
        functions of this worker's code tasks, until it stops taking work."""
        if msg.reply and not self._stopped:
            await quietly(msg.respond(self._functions))  # (guarded: never on a subject spear stores, replies.py)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Take no more work and let running attempts finish for `grace_s`. Attempts still running
        then are handed back (`released`, not used up) for another worker to run at once."""
        if self._stopped:
            return
        self._stopped = True  # (no more answers on who has a function: calls go to other workers, or end)
        self._stopping.set()
        self._no_new_children()
        for job in self._background:
            job.cancel()
        if self.follower is not None:
            await self.follower.stop()
        for consumer in list(self.consumers.values()):
            await consumer.stop()
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        if self.quick is not None:  # their ends are on their way: acknowledged, or handed to jobs
            # (every chain is answered or timed out within the request timeout: a job one hands on
            # is then among those awaited below)
            await self.quick.waiting.settle(max(grace_s, self.settings.nats.request_timeout_ms / 1000 + 0.5))
        if self.jobs:
            await self._finish_or_release(grace_s)
        if self._settler is not None:
            await quietly(self._settler.stop())
        if self.service:
            await self.service.stop()
        if self.processes is not None:
            await self.processes.close()
        for registered in self.registered.values():
            registered.retire()  # long-lived process instances end with the worker
        await self._let_reaper_go()
        self.threads.shutdown()

    async def _let_reaper_go(self) -> None:
        """The reaper ends with the last worker of this process stopped (reaper.py): waited for,
        so that none is left behind."""
        if self._holds_reaper:
            self._holds_reaper = False
            if reaper.let_go():
                await asyncio.get_running_loop().run_in_executor(None, reaper.wait, 5.0)

    async def _finish_or_release(self, grace_s: float) -> None:
        """Let running attempts finish for `grace_s`, saying what is awaited; then hand the rest
        back (`released`: the attempt is not used up, another worker runs it again at once)."""
        if self.running:
            log.info(
                "worker: stopping; waiting up to %.0f s for %d running execution(s)%s: %s",
                grace_s,
                len(self.running),
                f" ({self.stop_hint})" if self.stop_hint else "",
                _describe(self.running),
            )
        _, late = await asyncio.wait(self.jobs, timeout=grace_s)
        if not late:
            return
        if self.running:
            log.info(
                "worker: handing back %d execution(s) still running: %s", len(self.running), _describe(self.running)
            )
        for running in list(self.running.values()):
            running.release()
        _, late = await asyncio.wait(late, timeout=RELEASE_S)
        for job in late:  # stuck (say, JetStream unreachable): nak, and the attempt counts as lost
            job.cancel()
        if late:
            await asyncio.wait(late, timeout=2)

    def _on_delivery(self, delivery: Delivery, task_id: str, consumer: PullConsumer) -> None:
        """A delivered invocation: run here (quick.py), or in a task of its own. Whether it is
        surely its invocation's first is asked here, once and in the order deliveries are read:
        asked later, in each one's task, a delivery read before one asked already looked handed
        out again, and every delivery was planned with a read for the next 30 s (review17)."""
        try:
            meta = ack_info(delivery)
            first = self.surely_first(task_id, meta.stream_seq, meta.num_delivered)
        except (NotJSMessageError, ValueError):  # (not a JetStream ack subject: the usual path says so)
            first = False
        if first and self.cancelled_lately and delivery.subject.rsplit(".", 2)[-2] in self.cancelled_lately:
            first = False  # cancelled while it waited (probe33): planned from the log, never run at once
        if self._suspect(consumer):  # it may have waited out a pause or a stall: from the log
            first = False  # (never run at once)
            if len(self._suspects) < MAX_SUSPECTS:
                self._suspects.add(delivery.reply)
        if self.quick is None or not self.quick.take(delivery, consumer, first):
            self.dispatch(delivery, consumer, self.process(delivery, first))

    def _suspect(self, consumer: PullConsumer) -> bool:
        """Whether a delivery read now may have waited out a pause of this worker, or a stall of
        its connection, while JetStream handed its invocation out again (pauses.py)."""
        return self.pauses.suspect() or (isinstance(consumer, PullConsumer) and consumer.stalled())

    def dispatch(self, msg: Delivery, consumer: PullConsumer, work: Coroutine[Any, Any, None]) -> None:
        """Do `work` on a delivery in a task of its own; the consumer's slot is freed when it ends."""
        job = asyncio.get_running_loop().create_task(self._handle(msg, consumer, work))
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)

    async def _handle(self, msg: Delivery, consumer: PullConsumer, work: Coroutine[Any, Any, None]) -> None:
        reply = msg.reply  # (as read: an adopted delivery answers as a newer one)
        try:
            await work
        except asyncio.CancelledError:
            await self._hand_back(msg, reply)  # stopping: hand it back now rather than after ack_wait
        except StoreFull as exc:  # no room to store what it did: nothing runs until there is
            now = time.monotonic()
            if now - self._full_said_at > FULL_SAID_EVERY_S:  # said now and then, not per delivery
                self._full_said_at = now
                log.warning("worker: JetStream has no room to store events (%s); invocations wait", exc)
            await self._hand_back(msg, reply, STORE_FULL_RETRY_DELAY_S)
        except Exception:
            # JetStream unreachable or a bug: leave the message to be redelivered, never lost.
            log.exception("worker: invocation at %s not processed; it will be redelivered", msg.subject)
            await self._hand_back(msg, reply, CONFLICT_RETRY_DELAY_S)
        finally:
            self._suspects.discard(reply)
            consumer.done()

    async def _hand_back(self, msg: Delivery, reply: str, delay: float | None = None) -> None:
        """Hand a delivery back (nak) for another try, unless it may have waited out a pause or a
        stall (pauses.py): a nak of that one would hand a live attempt's invocation out at once
        (review21), so it is left to its ack wait instead."""
        if reply not in self._suspects:
            await quietly(msg.nak(delay=delay))

    # --- deciding ---------------------------------------------------------------------------------

    async def process(self, msg: Delivery, first: bool) -> None:
        """Handle one delivered `requested` event to its end (acked) or hand it back (nak);
        `first`: whether it is surely the invocation's first delivery (firsts.py)."""
        try:
            request = decode_event(msg.data, msg.subject)
        except BadEvent as exc:  # stored bytes never change: no later delivery will read them either
            await self._poison(msg, None, f"the invocation cannot be read: {exc}")
            return
        if not isinstance(request, Requested):
            await msg.term()
            return
        logs.set_execution(request.execution_id, request.task_id, request.function_name)
        # One CONSUMER span per delivery (so per attempt), under the `requested` event's context:
        # the events this worker appends, and the function's own span, are its children.
        attributes = self._delivery_attributes(msg, request) if tracing.may_record() else {}
        destination = self.names.event(request.task_id, "{execution_id}", "requested")
        with tracing.consumer(destination, msg.headers, attributes):
            try:
                await self._plan_and_run(msg, request, first)
                self._failures.pop(request.execution_id, None)
            except Exception as exc:
                if _infrastructure(exc):
                    raise
                failures = self._failures.pop(request.execution_id, 0) + 1
                if failures < self.settings.worker.poison_after:
                    self._remember_failure(request.execution_id, failures)
                    raise
                log.exception("worker: %s failed %d deliveries in a row; it ends POISON_MESSAGE", msg.subject, failures)
                await self._poison(msg, request, f"{failures} deliveries failed; last: {exception_text(exc)}")

    def _delivery_attributes(self, msg: Delivery, request: Requested) -> dict[str, str | int]:
        return {
            "messaging.destination.name": msg.subject,
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": self.names.worker_consumer(request.task_id),
            "messaging.message.id": f"{request.execution_id}:requested",
            "spear.execution_id": request.execution_id,
            "spear.delivery": ack_info(msg).num_delivered,
            "spear.worker_id": self.worker_id,
        }

    def quick_attempt_failed(self, msg: Delivery, consumer: PullConsumer, request: Requested, exc: Exception) -> bool:
        """A quick attempt (quick.py) whose outcome could not be described: one more delivery in
        a row that failed here, counted as `process` counts them. True: that made `poison_after`,
        and the invocation ends POISON_MESSAGE (in a task that settles the delivery); False: the
        caller hands it back (NATS or JetStream unreachable are not counted, as in `process`)."""
        if _infrastructure(exc):
            return False
        failures = self._failures.pop(request.execution_id, 0) + 1
        if failures < self.settings.worker.poison_after:
            self._remember_failure(request.execution_id, failures)
            return False
        log.error(
            "worker: %s failed %d deliveries in a row; it ends POISON_MESSAGE", msg.subject, failures, exc_info=exc
        )
        reason = f"{failures} deliveries failed; last: {exception_text(exc)}"
        self.dispatch(msg, consumer, self._poison(msg, request, reason))
        return True

    def _remember_failure(self, execution_id: str, failures: int) -> None:
        self._failures[execution_id] = failures
        if len(self._failures) > MAX_REMEMBERED_FAILURES:  # bounded: forget the oldest
            self._failures.pop(next(iter(self._failures)))

    async def _poison(self, msg: Delivery, request: Requested | None, reason: str) -> None:
        """End an invocation that cannot be processed FAILED (POISON_MESSAGE), with one terminal
        event. Its ids come from the subject (the authority), so this works even when not one
        byte of the `requested` event can be read."""
        _, task_id, execution_id, _ = msg.subject.rsplit(".", 3)
        named: Requested | _Named = request or _Named(execution_id, task_id)
        expect = ack_info(msg).stream_seq
        for _ in range(MAX_REPLANS):
            last = await self.store.last(execution_id)
            if last is not None and is_terminal(last.event):
                break  # it ended meanwhile: that end stands
            env = envelope(named, last.event.attempt if last is not None else 0)
            result = failure(ExecutionStatus.FAILED, ErrorCode.POISON_MESSAGE, reason[:2000], env)
            try:
                poisoned = Failed(**env, result=result)
                await self._append(poisoned, expect_last_seq=expect, msg_id=f"{execution_id}:terminal:poison")
                log.error("worker: %s ended POISON_MESSAGE: %s", execution_id, reason)
                break
            except AppendConflict as conflict:
                expect = conflict.last_seq if conflict.last_seq is not None else expect
        else:  # it moved on every time: never settled with nothing stored, decided on a later delivery
            await msg.nak(delay=CONFLICT_RETRY_DELAY_S)
            return
        await msg.ack()

    async def _plan_and_run(self, msg: Delivery, request: Requested, first: bool) -> None:
        running = self.running.get(request.execution_id)
        if running is not None and running.delivery is not None:
            # Handed out again while this worker runs its attempt: its in-progress acks did not
            # reach the server within the ack wait (this process was paused, or NATS stalled).
            # Planned from the log, the live attempt looked lost: WORKER_LOST, the function run
            # again beside it (probe27). It goes on, answering as the newest delivery.
            running.delivery.adopt(msg)
            await quietly(running.delivery.in_progress())
            return
        if request.execution_id in self.holding:
            # Handed out again while this worker stores the end of the attempt it ran (a nats-server
            # restarted without its consumer's record of the delivery: probe23). Planned now, from
            # a log without that end, it ran again, and the first run was dropped unseen.
            await msg.nak(delay=CONFLICT_RETRY_DELAY_S)
            return
        meta = ack_info(msg)
        if self.store_full_lately():
            first = False  # JetStream had no room lately: nothing runs before its `started` is stored
        # First delivery: the requested event is, almost always, the last one; if not, the
        # conditional append says so and the real last event is read. Not so for an invocation
        # a gateway ran itself (`spear.service.inline`): its attempt is stored right behind it.
        ran_inline = meta.num_delivered == 1 and RAN_INLINE_HEADER in (msg.headers or {})
        if ran_inline:
            # Its end is almost always stored by now: read with other such deliveries' (settle.py).
            last = await self._settler.ended(request.execution_id) if self._settler is not None else None
            if last is None:
                last = await self._last_stored(request.execution_id)
            last = await self._until_stored_by_gateway(request, last)
            if _still_storing(last, request):
                # The gateway that ran it has not stored its attempt's end yet (it stores the rest
                # one by one, or it stalled): give it time rather than run the function a second
                # time. Delivered again, the invocation is planned as usual. (Not a delivery that
                # may have waited out a pause: its nak would hand a live retry out again: review21.)
                await self._hand_back(msg, msg.reply, self._inline_hold_off_s)
                return
        else:
            last = Stored(request, meta.stream_seq) if first else await self._last_stored(request.execution_id)
        for _ in range(MAX_REPLANS):
            try:
                await self._step(msg, request, last, quick=first)
                return
            except AppendConflict:
                last = await self._last_stored(request.execution_id)
                first = False  # something came between: `started` goes first from now on
        # Said, so that an invocation handed back again and again shows in the logs.
        log.warning("worker: %s moved on while planned %d times; handed back", request.execution_id, MAX_REPLANS)
        await self._hand_back(msg, msg.reply, CONFLICT_RETRY_DELAY_S)

    def surely_first(self, task_id: str, stream_seq: int, num_delivered: int) -> bool:
        """Whether a delivery is surely its invocation's first: nothing of the execution can have
        happened yet (firsts.py). Asked once per delivery: it notes the delivery."""
        now = time.monotonic()
        reconnects = self.nc.stats["reconnects"]
        if reconnects != self._reconnects:  # cancellations stored meanwhile went unseen
            self._reconnects = reconnects
            self._firsts.be_careful(now)
        return self._firsts.surely_first(task_id, stream_seq, num_delivered, now)

    async def _on_cancelled(self, msg: Msg) -> None:
        """A `cancelled` event stored (or, from anyone allowed to publish here, imitated: it only
        makes a delivery planned from the log): its invocation, if still to be delivered, is not
        run before a read (an invocation cancelled while PENDING never starts, probe33)."""
        execution_id = msg.subject.rsplit(".", 2)[-2]
        self.cancelled_lately[execution_id] = None
        if len(self.cancelled_lately) > MAX_CANCELLED_LATELY:
            del self.cancelled_lately[next(iter(self.cancelled_lately))]

    def _left_to_its_attempt(self, msg: Delivery, request: Requested, last: Stored) -> bool:
        """Whether a delivery read in a pause's or a stall's aftermath (pauses.py) finds an attempt
        that looks lost: it may have waited out the pause while JetStream handed the invocation out again
        to a worker that runs that attempt now. Left alone, neither acknowledged nor handed back
        (a nak would hand the live attempt's invocation out at once): if that attempt is lost
        indeed, the invocation comes again an ack wait later, and is taken for lost then."""
        if msg.reply not in self._suspects:
            return False
        step, attempt = next_step(last.event, request.max_retries)
        if step not in (NextStep.RETRY_LOST, NextStep.FAIL_LOST):
            return False
        # Once only, give or take the burst one pause leaves: a live attempt's worker keeps its
        # invocation from being handed out again, so one that comes an ack wait after this worker
        # first left it alone is a lost attempt's, however often this worker stalls (review22).
        now = time.monotonic()
        first_left = self._left_alone.setdefault(request.execution_id, now)
        if now - first_left > self.settings.worker.ack_wait_ms / 1000:
            del self._left_alone[request.execution_id]
            return False
        if len(self._left_alone) > MAX_SUSPECTS:  # (a bound: the oldest are forgotten)
            self._left_alone.pop(next(iter(self._left_alone)))
        log.info(
            "worker: %s: read after a pause or a stall, a delivery finds attempt %d running"
            " elsewhere, or lost; left to that attempt",
            request.execution_id,
            attempt,
        )
        return True

    def store_full_lately(self) -> bool:
        """Whether JetStream had no room to store an event lately."""
        full_at = self.store.full_at
        return full_at is not None and time.monotonic() - full_at < STORE_FULL_RETRY_DELAY_S * 2

    @property
    def stopping(self) -> bool:
        """Whether the worker takes no more work."""
        return self._stopped

    async def _until_stored_by_gateway(self, request: Requested, last: Stored | None) -> Stored | None:
        """The last event of an invocation its gateway ran, read again for a moment while the
        gateway's attempt shows only in part: on a replicated stream its events are appended one
        by one, each acknowledged, and a delivery usually comes while the rest is on its way."""
        for _ in range(INLINE_SETTLE_TRIES):
            if not _still_storing(last, request):
                break
            await asyncio.sleep(INLINE_SETTLE_PAUSE_S)
            last = await self._last_stored(request.execution_id)
        return last

    async def _started_at(self, execution_id: str, attempt: int) -> str | None:
        """When an attempt of the execution started, from its newest `started` (for a lost
        attempt's result: read only then)."""
        # (its newest `started` only: a long STREAM's history is read in seconds, with no sign of
        # life for the delivery, so it was handed out again, and read again, every ack wait)
        stored = await self.store.last_of_kind(execution_id, "started")
        if stored is not None and isinstance(stored.event, Started) and stored.event.attempt == attempt:
            return stored.event.at
        return None

    async def _last_stored(self, execution_id: str) -> Stored | None:
        """The execution's last event, read again for a moment while none is found: a delivered
        invocation's events are stored, however a lagging replica answers (None: still not seen)."""
        for tries_left in reversed(range(STALE_READ_TRIES)):
            last = await self.store.last(execution_id)
            if last is not None or not tries_left:
                return last
            await asyncio.sleep(STALE_READ_PAUSE_S)
        return None

    async def _step(self, msg: Delivery, request: Requested, last: Stored | None, quick: bool) -> None:
        """Do what the execution's last event calls for; `quick`: an attempt may run before its
        `started` is stored (the delivery is surely the invocation's first)."""
        wait_ms = backoff_left_ms(last.event if last else None, time.time())
        if wait_ms:  # a `retrying` whose backoff has not passed: the next attempt waits for it
            await self._hand_back(msg, msg.reply, wait_ms / 1000)
            return
        if last is None:  # it was delivered, so it is stored: the read missed it, ask again later
            log.warning("worker: %s delivered but its events not found yet; handed back", request.execution_id)
            await self._hand_back(msg, msg.reply, CONFLICT_RETRY_DELAY_S)
            return
        if self._left_to_its_attempt(msg, request, last):
            return
        planned = await plan(self._append, request, last, functools.partial(self._started_at, request.execution_id))
        if planned is None:
            await msg.ack()
            return
        if await self._handed_on(msg, request):
            return
        async with self._slot(msg) as at_once:
            # A delivery that waited for a slot was planned from what was read before the wait: a
            # cancel stored meanwhile would be seen only once `started` was refused, after the
            # function had run (probe33). It stores `started`, fenced on that read, first.
            await self._attempt(msg, request, planned.attempt, planned.last_seq, quick and at_once)

    async def _handed_on(self, msg: Delivery, request: Requested) -> bool:
        """Hand back (True) a call of a function this worker's release of a code task lacks while
        another live worker has it (a rolling upgrade: the registry holds the newest release's
        definition, and gateways accept its new functions), for that worker to take: nothing is
        stored, no attempt is used, and no failure is counted towards `poison_after`. False: run
        it here, which ends it FUNCTION_NOT_FOUND when no live worker has the function."""
        task = self.tasks.get(request.task_id)
        if task is None or request.task_id in self.registered or request.function_name in task.functions:
            return False
        if self._stopped:  # (it answers no more, itself included: the question would wait its whole window)
            await self._hand_back(msg, msg.reply)
            return True
        await quietly(msg.in_progress())  # (asking may take a while: the delivery stays this worker's)
        window_s = min(elsewhere.WINDOW_S, self.settings.worker.ack_wait_ms / 3000)
        if not await self.elsewhere.serves(request.task_id, request.function_name, window_s):
            log.warning(
                "worker: %s: no live worker has function %r of task %r; it ends FUNCTION_NOT_FOUND",
                request.execution_id,
                request.function_name,
                request.task_id,
            )
            return False
        self.handed_on += 1
        said = (request.task_id, request.function_name)
        if said not in self._handed_on_said and len(self._handed_on_said) < MAX_HANDED_ON_SAID:
            self._handed_on_said.add(said)  # said once per function, not per call
            log.info(
                "worker: calls of %s.%s, which this worker's release lacks, are handed on to a worker that has it",
                request.task_id,
                request.function_name,
            )
        # Longer each time it comes back (up to HAND_ON_MAX_DELAY_S): while the worker that has it
        # is busy, the others would hand it round every 50 ms, a delivery and a nak each
        delivered = ack_info(msg).num_delivered
        await self._hand_back(msg, msg.reply, min(HAND_ON_MAX_DELAY_S, HAND_ON_DELAY_S * delivered))
        return True

    @contextlib.asynccontextmanager
    async def _slot(self, msg: Delivery) -> AsyncIterator[bool]:
        """One of the worker's `concurrency` slots for an attempt, waited for with signs of life
        for the delivery (it is this worker's, PENDING, not redelivered meanwhile). Yields whether
        one was free at once."""
        at_once = not self.slots.locked()
        if at_once:
            # taken now, without yielding (review31: `wait_for` runs the acquire in a task of its
            # own, so two deliveries read together both saw a free slot, and one then waited)
            await self.slots.acquire()
        beat_s = self.settings.worker.ack_wait_ms / 3000
        while not at_once:
            try:
                await asyncio.wait_for(self.slots.acquire(), beat_s)
                break
            except TimeoutError:
                await quietly(msg.in_progress())
        try:
            yield at_once
        finally:
            self.slots.release()

    async def _append(
        self,
        event: Event,
        *,
        expect_last_seq: int | None = None,
        msg_id: str | None = None,
        expect_last_msg_id: str | None = None,
    ) -> Appended:
        """Append under the current span (the delivery's), so the event joins the invocation's trace."""
        return await self.store.append(
            event, expect_last_seq=expect_last_seq, msg_id=msg_id, expect_last_msg_id=expect_last_msg_id
        )

    # --- running ----------------------------------------------------------------------------------

    def inline_function(self, request: Requested) -> Function | None:
        """The inline function a call names, if a task served from code has it (None otherwise:
        a registered task's function is resolved with a wait, `_function`)."""
        task = self.tasks.get(request.task_id)
        function = task.functions.get(request.function_name) if task else None
        if function is None or not function.inline or function.native is not None:
            return None
        return None if request.task_id in self.registered else function

    async def _function(self, request: Requested) -> tuple[Function | None, str]:
        """The function a call names, and the task instance it runs in ("" for code tasks)."""
        registered = self.registered.get(request.task_id)
        if registered is not None:
            return await registered.resolve(request.function_name, request.force_new_instance)
        task = self.tasks.get(request.task_id)
        return (task.functions.get(request.function_name) if task else None), ""

    async def _attempt(self, msg: Delivery, request: Requested, attempt: int, last_seq: int, quick: bool) -> None:
        """Run one attempt, fenced on the execution's event at `last_seq`. Its `started` is stored
        before the function is called, so that a cancel of the execution while it was pending
        keeps it from running (CONTRACT §3: "never starts"). An inline function (declared quick
        and free of side effects) is called first: having logged nothing, it gets `started` and
        its end sent back to back, one round trip instead of two, with no acknowledgement of
        `started` (`Opening.with_end`); `started.at` is still when it began."""
        function, instance_id = await self._function(request)
        ctx = Context(
            request.execution_id,
            request.task_id,
            request.function_name,
            attempt,
            deadline=time.time() + request.timeout_ms / 1000,
        )
        running = Running(ctx, function, msg)
        self.running[request.execution_id] = running  # before `started`, so no cancel request slips by
        started = Started(**envelope(request, attempt), worker_id=self.worker_id, instance_id=instance_id)
        appends, opening = self._opening(msg, request, ctx, started, last_seq)
        try:
            if not quick or (function is not None and not function.inline):
                # Delivered before (or perhaps: firsts.py): the execution may have ended, or the
                # run taken its worker down before `started` (a function that exits the process).
                # Stored first, `started` fences off an execution that moved on and makes the next
                # loss count against the retries; without it the function ran again and again,
                # each run looking like the first.
                # And a function that is not inline may do what a cancel is meant to prevent:
                # called before its `started` was stored, it ran for executions cancelled while
                # pending, to its end, unseen in their history (probe42: 40 of 40 cancels sent
                # right after the invocation; some started after the cancel was confirmed).
                await self._patiently(msg, opening.begin, "the start of an attempt")
                ctx.deadline = time.time() + request.timeout_ms / 1000  # (its time runs from now)
            outcome = await run_attempt(
                function,
                request.parameters,
                running,
                request.timeout_ms,
                started.at,
                self.threads,
                self.max_result_size(),
                appends,
                self._processes_for(function),
                stream=request.execution_mode == ExecutionMode.STREAM,
                instance_id=instance_id,
            )
            if outcome.stop_signalled and await self._stopping_soon():
                # Its process got the stop signal its worker got (systemd signals the whole
                # cgroup at once): a stop, handed back, not the function's failure (probe45:
                # FAILED, a retry used, where a thread's attempt was handed back).
                running.released = True
            if running.released and opening.started_seq is None:  # nothing stored: hand it back as it came
                await quietly(msg.nak())
                return
            self.holding.add(request.execution_id)  # it ran: not run again while its end is stored
            last_seq = await self._opened(
                msg, opening, appends, last_seq, begin=not running.released, max_retries=request.max_retries
            )
        except BaseException:
            self.holding.discard(request.execution_id)
            raise
        finally:
            opening.stop()
            self.running.pop(request.execution_id, None)
        try:
            if running.released:
                await self._release(msg, request, attempt, last_seq)
                return
            await self._patiently(msg, lambda: self._finish(msg, request, outcome, last_seq, opening))
        finally:
            self.holding.discard(request.execution_id)

    def _no_new_children(self) -> None:
        if self.processes is not None:
            self.processes.wind_down()

    async def _stopping_soon(self) -> bool:
        """Whether this worker stops, now or within STOP_SIGNAL_WINDOW_S: a stop signal sent to
        every process at once may reach a function's process before the worker's own handler runs."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), STOP_SIGNAL_WINDOW_S)
        return self._stopped

    def _opening(
        self, msg: Delivery, request: Requested, ctx: Context, started: Started, last_seq: int
    ) -> tuple[AttemptAppends, Opening]:
        """An attempt's appends (its log lines and chunks), held until its `started` is stored."""
        appends = AttemptAppends(self._append, self._append_batch, request, ctx, None, self.max_result_size())
        ctx.on_report = appends.report
        opening = Opening(
            self._append, self.store, msg, started, last_seq, appends, self.settings.worker.ack_wait_ms / 3000
        )
        return appends, opening

    async def _opened(
        self, msg: Delivery, opening: Opening, appends: AttemptAppends, last_seq: int, begin: bool, max_retries: int
    ) -> int:
        """The sequence an ended attempt's end follows: its `started` stored first (with `begin`)
        if it logged or yielded before that was, then what it logged and yielded is stored.
        `started` is stored as patiently as the end: the attempt has run, and given up on (a
        nats-server restarting), its outcome was lost and the function run again, unseen in the
        history (probe22)."""
        if begin and not appends.quiet and opening.started_seq is None:
            # it logged or yielded: those need `started` first
            for _ in range(MAX_REPLANS):
                try:
                    await self._patiently(msg, lambda: opening.begin(beat=False))
                    break
                except AppendConflict:
                    # Refused: only junk (or nothing that changes the plan) got in before it, and it
                    # follows that, as the end does in `_finish`; else the caller plans again.
                    started = opening.started
                    last = await self._last_stored(started.execution_id)
                    if last is None or next_step(last.event, max_retries) != (NextStep.START, started.attempt):
                        raise
                    opening.follow(last.seq)
            else:
                raise AppendConflict(f"{opening.started.execution_id} moved on while its start was stored")
        if opening.started_seq is not None:
            return await appends.close()
        return last_seq

    def finish_quick(
        self,
        msg: Delivery,
        consumer: PullConsumer,
        request: Requested,
        ctx: Context,
        started: Started,
        outcome: Outcome,
        last_seq: int,
        reports: list[Report],
    ) -> None:
        """Store, in a task, the end of a quick attempt run from the read loop (quick.py) whose
        chain was not stored from there, after the lines it logged, as `_attempt` stores a quick
        attempt's end."""
        self.dispatch(msg, consumer, self._finish_quick(msg, request, ctx, started, outcome, last_seq, reports))

    async def _finish_quick(
        self,
        msg: Delivery,
        request: Requested,
        ctx: Context,
        started: Started,
        outcome: Outcome,
        last_seq: int,
        reports: list[Report],
    ) -> None:
        logs.set_execution(request.execution_id, request.task_id, request.function_name)
        destination = self.names.event(request.task_id, "{execution_id}", "requested")
        try:
            with tracing.consumer(destination, msg.headers, {}):  # (tracing is off: its trace, continued)
                appends, opening = self._opening(msg, request, ctx, started, last_seq)
                try:
                    for progress, message, at in reports:
                        appends.report(progress, message, at)
                    last_seq = await self._opened(msg, opening, appends, last_seq, True, request.max_retries)
                except AppendConflict:  # it moved on before `started` (a cancel request): planned again, as usual
                    # Said: the run happened, and if another attempt took the execution over (handed out
                    # again by a restarted nats-server: probe23) it is in no history.
                    log.warning(
                        "worker: %s moved on before the start of attempt %d was stored; that run's outcome is"
                        " dropped and the invocation planned again",
                        request.execution_id,
                        started.attempt,
                    )
                    self.holding.discard(request.execution_id)  # (its end is not to be stored: planned anew here)
                    await self._plan_and_run(msg, request, first=False)
                    return
                finally:
                    opening.stop()
                await self._patiently(msg, lambda: self._finish(msg, request, outcome, last_seq, opening))
        finally:
            self.holding.discard(request.execution_id)  # however it ended

    async def _patiently(
        self, msg: Delivery, store: Callable[[], Awaitable[None]], what: str = "the end of an attempt"
    ) -> None:
        """Store an attempt's end (or `what`), trying again while JetStream does not answer (a
        cluster electing a new leader after a node loss: a few seconds) or has no room, for up to
        STORE_PATIENCE_S, with signs of life for the delivery meanwhile. Given up at once, the end
        was lost with the outcome: the redelivery found `started` and nothing after it, and counted
        a crash (WORKER_LOST, or the function run again); so was a `started` stored whose answer
        was lost (review44). Trying again is safe: each event is deduplicated by its message id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STORE_PATIENCE_S
        pause_s = 0.1
        beat_s = self.settings.worker.ack_wait_ms / 3000
        while True:
            try:
                await store()
                return
            except (StoreUnavailable, StoreFull) as exc:  # (full: review15 saw the outcome dropped, the run repeated)
                if loop.time() + pause_s > deadline:
                    raise
                if pause_s == 0.1:  # said once an attempt
                    log.info("worker: %s is not stored yet (%s); trying again", what, exc)
            await quietly(msg.in_progress())  # the delivery stays this worker's meanwhile
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0, beat_s)

    async def _release(self, msg: Delivery, request: Requested, attempt: int, last_seq: int) -> None:
        """Hand an attempt back while stopping: `released`, then the invocation at once to another
        worker. If the execution moved meanwhile (a cancel request), the redelivery decides."""
        released = Released(**envelope(request, attempt), worker_id=self.worker_id, reason="worker stopping")
        try:
            await self._append(released, expect_last_seq=last_seq)
            log.info("worker: %s attempt %d handed back", request.execution_id, attempt)
        except AppendConflict:
            pass
        await quietly(msg.nak())

    async def _append_batch(self, events: list[Event], expect_last_seq: int) -> Appended:
        """Like `_append`: under the current span, so the events join the invocation's trace."""
        return await self.store.append_batch(events, expect_last_seq=expect_last_seq)

    def _processes_for(self, function: Function | None) -> ProcessPool | None:
        if function is None or not function.in_process(self.settings.worker.isolation):
            return None
        if self.processes is None:  # a task registered at runtime is the first to want one
            self.processes = ProcessPool(self.settings.worker.concurrency)
        return self.processes

    @property
    def capacity(self) -> int:
        """The attempts this worker takes at once (per task): its concurrency, less the overrunning
        functions beyond the spare threads (threads.py)."""
        return self.settings.worker.concurrency - self.threads.excess

    def max_result_size(self) -> int:
        """The most bytes of JSON a result may take: what a terminal event can carry."""
        return max_result_bytes(self.nc.max_payload)

    async def _record(
        self, msg: Delivery, request: Requested, outcome: Outcome, last_seq: int, opening: Opening | None = None
    ) -> None:
        """Store how the attempt ended (`retrying`, or its terminal event) after the attempt's
        event at `last_seq`, or right behind its `started` if that is not stored yet."""
        end, msg_id = end_event(request, outcome, self.settings.retry)
        await self._append_after(opening, end, last_seq, msg_id)
        await _settle_ended(msg, end)

    async def _append_after(self, opening: Opening | None, event: Event, last_seq: int, msg_id: str | None) -> None:
        if opening is not None and opening.started_seq is None:
            await opening.with_end(event, msg_id)
        else:
            await self._append(event, expect_last_seq=last_seq, msg_id=msg_id)

    async def _finish(
        self, msg: Delivery, request: Requested, outcome: Outcome, last_seq: int, opening: Opening
    ) -> None:
        """Store how the attempt ended. If the execution changed meanwhile, decide from its last
        event: a cancel request makes it `cancelled`; an end that came first stands; if only
        unreadable junk got in (after this attempt's `started`, or before it when nothing else
        did), store the end after that anyway; if a newer attempt owns it, drop this result."""
        result = outcome.result
        if result.status in (ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT):
            # the delivery's span says how its attempt ended (probe54: a time limit left it unmarked)
            tracing.mark_current_error(f"{result.error_code}: {result.error_message}"[:200])
        for _ in range(MAX_REPLANS):
            try:
                await self._record(msg, request, outcome, last_seq, opening)
                return
            except AppendConflict:
                last = await self._last_stored(request.execution_id)
            if last is None:  # the read missed what was delivered: decide on a later delivery
                log.warning("worker: %s events not found after a conflict; handed back", request.execution_id)
                await msg.nak(delay=CONFLICT_RETRY_DELAY_S)
                return
            if _own_end(last, result):
                # A try that got no answer (nats-server stalled) stored it, and this one's fence
                # (checked before its message id) refused it: stored once, not another's end.
                log.info(
                    "worker: result of %s attempt %d (%s) stored before its acknowledgement was lost",
                    request.execution_id,
                    result.attempt,
                    last.event.kind,
                )
                await _settle_ended(msg, last.event)
                return
            if isinstance(last.event, CancelRequested):
                try:
                    await append_cancelled(self._append, request, last, started_at=result.started_at)
                except AppendConflict:  # asked again, or ended meanwhile: read and decide again
                    continue
                await msg.ack()
                return
            if is_terminal(last.event):
                # A forced cancel ends it so by design (probe30: a warning for an operator's act);
                # any other end meanwhile (a live attempt elsewhere) is worth one.
                forced = isinstance(last.event, Cancelled)
                log.log(
                    logging.INFO if forced else logging.WARNING,
                    "worker: result of %s attempt %d fenced off: the execution ended meanwhile (%s)",
                    request.execution_id,
                    result.attempt,
                    last.event.kind,
                )
                await msg.ack()
                return
            if opening.found(last):
                if not (isinstance(last.event, (Started, Logged, Chunk)) and last.event.attempt == result.attempt):
                    break
                last_seq = last.seq  # still this attempt's execution
            elif next_step(last.event, request.max_retries) == (NextStep.START, result.attempt):
                opening.follow(last.seq)  # nothing that changes the plan got in before `started`
            else:
                break
        else:  # it moved on every time (cancel requests keep coming): decided on a later delivery
            log.warning(
                "worker: %s moved on while its end was stored %d times; handed back", request.execution_id, MAX_REPLANS
            )
            await msg.nak(delay=CONFLICT_RETRY_DELAY_S)
            return
        log.warning(
            "worker: result of %s attempt %d fenced off: a newer attempt owns it", request.execution_id, result.attempt
        )

    async def _on_cancel_requested(self, msg: Msg) -> None:
        """A live cancel request is a hint: it counts only if it carries the stream's own headers
        and the execution's last stored event is that cancel request, or the end that followed it
        (anyone allowed to publish here could imitate the headers). Costs one read, per cancel
        request only."""
        execution_id = self.names.event_execution_id(msg.subject)
        running = self.running.get(execution_id)
        if running is None or not is_stored_hint(msg, self.names.stream):
            return
        try:
            last = await self.store.last(execution_id)
        except Exception as exc:  # NATS unreachable: the terminal append will meet the request anyway
            log.warning("worker: cancel request for %s not confirmed: %s", execution_id, exc)
            return
        if last is None or self.running.get(execution_id) is not running:
            return
        if isinstance(last.event, CancelRequested):
            running.cancel(force=last.event.force)
        elif is_terminal(last.event):  # a forced cancel stores `cancelled` right after its request
            running.cancel(force=True)


async def _settle_ended(msg: Delivery, end: Event) -> None:
    """Settle the delivery of an attempt whose end `end` is stored: handed back for the backoff a
    `retrying` asks for, else acknowledged."""
    if isinstance(end, Retrying):
        await msg.nak(delay=end.delay_ms / 1000)
    else:
        await msg.ack()


def _own_end(last: Stored, result: StoredResult) -> bool:
    """Whether `last`, the execution's last event, is the end of the attempt whose outcome is
    `result`, stored by this worker: a `retrying` or terminal event of that attempt with this very
    result (when it ended, to the millisecond, its value or error). Another's end of the attempt
    (a redelivery that took this worker for lost) carries a result of its own; a `retrying` is
    stamped anew at each try, its result is not."""
    event = last.event
    if not isinstance(event, (Retrying, Completed, Failed, TimedOut, Cancelled)) or event.attempt != result.attempt:
        return False
    return event.result == _STORED_RESULT.decode(msgspec.json.encode(result))  # as read back: JSON's types


_STORED_RESULT = msgspec.json.Decoder(StoredResult)


def _describe(running: dict[str, Running]) -> str:
    shown = [f"{execution_id} ({r.ctx.function_name}, attempt {r.ctx.attempt})" for execution_id, r in running.items()]
    return ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")


def _still_storing(last: Stored | None, request: Requested) -> bool:
    """Whether an invocation a gateway ran shows only part of its attempt: `requested` alone, or
    the attempt's `started` (or a log line) without its end."""
    if last is None:
        return False
    step, _ = next_step(last.event, request.max_retries)
    return isinstance(last.event, Requested) or step in (NextStep.RETRY_LOST, NextStep.FAIL_LOST)


class _Named(NamedTuple):
    """An execution known only by its subject (its `requested` event cannot be read)."""

    execution_id: str
    task_id: str
    function_name: str = ""


def _infrastructure(exc: Exception) -> bool:
    """NATS or JetStream out of reach: try again later, this says nothing about the invocation."""
    return isinstance(exc, (StoreUnavailable, StoreFull, *UNREACHABLE, ConnectionError)) or (
        isinstance(exc, ApiError) and exc.code == ErrorCode.UNAVAILABLE
    )
