"""The task registry's events on JetStream: appending them (fenced per task) and following them.

Writers publish to `P.append_task.<task_id>.<kind>`; the registry stream stores each as
`P.tasks.<task_id>.<kind>` and re-publishes it once stored. An append names the sequence of the
task's last event it is based on, so two registrations of one id never both win. Followers
(every gateway and worker) replay the stream into a `Registry` and then keep it current: the
re-published subjects only wake them up, what they apply is read back from the stream (batched
direct gets), so they apply each stored event once and in order, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from spear.core.eventstore import StoreUnavailable
from spear.core.names import Names
from spear.core.taskevents import AnyTaskEvent, Registry, TaskEvent, decode_task_event, encode_task_event
from spear.jetstream import directget
from spear.jetstream.errors import UNREACHABLE, append_refusal

log = logging.getLogger(__name__)

POLL_S = 1.0  # a missed wake-up (core NATS is at-most-once) is caught up after this at the latest


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, object] | None = None


class RegistryStore:
    """The task registry's stream: appends fenced per task, and reads of what it stores."""

    def __init__(self, nc: Client, names: Names, timeout: float = 5.0):
        self.nc = nc
        self.names = names
        self.timeout = timeout

    async def append(self, event: TaskEvent, expect_last_seq: int) -> int:
        """Store one event of its task, if the task's newest event is still at `expect_last_seq`
        (0: none); AppendConflict otherwise. Returns the stored sequence."""
        headers = {
            "Nats-Expected-Stream": self.names.registry_stream,
            "Nats-Expected-Last-Subject-Sequence": str(expect_last_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": self.names.task_events(event.task_id),
        }
        subject = self.names.task_append(event.task_id, event.kind)
        try:
            reply = await self.nc.request(subject, encode_task_event(event), timeout=self.timeout, headers=headers)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"JetStream did not store the registry event: {type(exc).__name__}") from None
        ack = msgspec.json.decode(reply.data, type=_PubAck)
        if ack.error:
            raise append_refusal(ack.error)
        return ack.seq

    async def last(self, task_id: str) -> tuple[AnyTaskEvent, int] | None:
        """The task's newest registry event and its sequence (one direct get)."""
        found = await directget.newest(
            self.nc, self.names.registry_stream, self.names.task_events(task_id), self.timeout
        )
        return None if found is None else (decode_task_event(found.data), found.seq)

    async def after(self, seq: int) -> list[tuple[AnyTaskEvent, int]]:
        """Every stored registry event after `seq`, in order (undecodable ones skipped, logged)."""
        found = []
        stream, subjects = self.names.registry_stream, self.names.task_events("*")
        async for msg in directget.read_all(self.nc, stream, subjects, seq, self.timeout):
            try:
                found.append((decode_task_event(msg.data), msg.seq))
            except msgspec.DecodeError:
                log.error("task registry: undecodable event at %s skipped", msg.subject)
        return found


Listener = Callable[[AnyTaskEvent], None]


class RegistryFollower:
    """A `Registry` kept current from the stream; `listener` hears each event that changed it."""

    def __init__(self, store: RegistryStore, listener: Listener | None = None):
        self.store = store
        self.registry = Registry()
        self.read_seq = 0  # the stream read so far, in order
        self.listener = listener
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe, then replay everything stored so far before returning."""

        async def wake(msg: Msg) -> None:
            self._wake.set()

        self._sub = await self.store.nc.subscribe(self.store.names.task_events("*"), cb=wake)
        await self.catch_up()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        """Stop following the registry stream."""
        if self._task:
            self._task.cancel()
        if self._sub:
            with contextlib.suppress(Exception):  # the connection is closing: nothing to undo
                await self._sub.unsubscribe()

    def apply(self, event: AnyTaskEvent, seq: int) -> None:
        """Fold one stored event in (a writer applies its own appends at once this way)."""
        if self.registry.apply(event, seq) and self.listener:
            try:
                self.listener(event)
            except Exception:
                log.exception("task registry: a listener failed on %s %s", event.kind, event.task_id)

    async def catch_up(self) -> None:
        """Apply what the stream stored since the last read. (Reads resume from what was read,
        not from a writer's own applies, which may run ahead of events not read yet.)"""
        for event, seq in await self.store.after(self.read_seq):
            self.apply(event, seq)
            self.read_seq = seq

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()  # before reading: an event stored during the read wakes the next one
            try:
                await self.catch_up()
            except Exception as exc:  # JetStream away for a while: the next round tries again
                log.warning("task registry: catching up failed: %s", exc)
