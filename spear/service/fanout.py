"""Live event feeds that share one reader per followed subject in a process (probe57).

The SSE routes follow stored events: the re-published `P.exec.…` messages only wake a reader up,
and what it sends is read back from the stream (`spear.service.follow`). Done per client, each
stored event cost one stream read, decode, redaction and encoding for every open feed, and one
delivered copy of the re-published message for each: 200 open feeds of `GET /api/v1/events` made
300 SYNC calls take 15 s instead of 0.2 s, in the process that is the NATS gateway too.

Here a process has one reader per followed subject (every execution, one task's, one
execution's), shared by all its clients: it reads each stored event once, in stream order, shows
it once (redacted, encoded) and hands the same objects to each client's queue. A client's queue
is bounded (`MAX_QUEUED_EVENTS`, `MAX_QUEUED_BYTES`): a client that takes less than comes, or
nothing, is not given more (the reader never waits for it, memory does not grow); once it has
taken what it holds it falls back to reading the stream by itself, a page at a time at its own
pace, from after the last event it sent, and joins the shared reader again. A client that joins
(or resumes after `Last-Event-ID`) behind the shared reader reads what it missed the same way.

Joining comes before reading by itself, so nothing falls between the two: the queue gets every
event the shared reader reads after the joining, and a client drops what it already sent (by
stream sequence). Each client so sends every stored event it wants exactly once, in stream order.
The reader starts with its first client and ends with its last one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg

from spear.aio import detached
from spear.core.events import AnyEvent, encode_event, is_terminal
from spear.core.eventstore import Stored
from spear.service.follow import unsubscribed

MAX_QUEUED_EVENTS = 1024  # events a client's queue holds for it (past that it reads by itself)
MAX_QUEUED_BYTES = 1 << 20  # and their bytes (one event over it is queued alone)


class Shown(NamedTuple):
    """A stored event as readers may see it (redacted), encoded once for every client: as the
    SSE frame the HTTP routes send (`id:` its stream sequence, `event:` its kind, `data:` it)."""

    seq: int
    event: AnyEvent
    frame: bytes

    @classmethod
    def of(cls, seq: int, event: AnyEvent) -> Shown:
        """`event` (as readers may see it), stored at `seq`, with its frame."""
        return cls(seq, event, b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event.kind.encode(), encode_event(event)))


Read = Callable[[int], Awaitable[list[Stored]]]  # stored events after a sequence (a page)
Show = Callable[[Stored], Shown]
Wanted = Callable[[Shown], bool] | None  # None: every event


class _Behind(Exception):
    """The client's queue overflowed: it reads by itself from after its last event."""


class _Stopped(Exception):
    """The shared readers stopped (the service is stopping): the client's feed ends."""


class _Queue:
    """One client's events from the shared reader, bounded."""

    def __init__(self, wanted: Wanted):
        self.wanted = wanted
        self.batches: deque[list[Shown]] = deque()
        self.count = 0
        self.size = 0
        self.overflowed = False
        self.failed: Exception | None = None
        self.ready = asyncio.Event()

    def offer(self, batch: list[Shown], size: int) -> None:
        """Queue the wanted events of `batch` (`size`: its bytes), unless that would take the
        queue past its bounds: then it is marked overflowed and gets nothing more."""
        if self.overflowed:
            return
        if self.wanted is not None:
            batch = [shown for shown in batch if self.wanted(shown)]
            if not batch:
                return
            size = sum(len(shown.frame) for shown in batch)
        if self.batches and (self.count + len(batch) > MAX_QUEUED_EVENTS or self.size + size > MAX_QUEUED_BYTES):
            self.overflowed = True
        else:
            self.batches.append(batch)
            self.count += len(batch)
            self.size += size
        self.ready.set()

    def fail(self, exc: Exception) -> None:
        self.failed = exc
        self.ready.set()

    async def take(self, idle_s: float) -> list[Shown] | None:
        """Every event queued (at least one), or None after `idle_s` without any; _Behind once
        an overflowed queue is empty, the shared reader's error once it failed."""
        if not self.batches and not self.overflowed and self.failed is None:
            self.ready.clear()
            try:
                async with asyncio.timeout(idle_s):
                    await self.ready.wait()
            except TimeoutError:
                return None
        if self.batches:
            taken = self.batches.popleft() if len(self.batches) == 1 else [s for b in self.batches for s in b]
            self.batches.clear()
            self.count = self.size = 0
            return taken
        if self.failed is not None:
            raise self.failed
        raise _Behind


class _Reader:
    """The one reader of a subject: reads what is stored after `position` when woken (or every
    `idle_s`: the wake-ups are at-most-once) and hands it to every queue."""

    def __init__(self, readers: SharedReaders, subject: str, read: Read, show: Show, position: int):
        self.readers = readers
        self.subject = subject
        self.read = read
        self.show = show
        self.position = position  # the last sequence read: what it read was handed to the queues there were
        self.queues: set[_Queue] = set()
        self.task = detached(self._run(), name=f"shared reader of {subject}")

    async def _run(self) -> None:
        wake = asyncio.Event()

        async def on_message(msg: Msg) -> None:
            wake.set()

        sub = await self.readers.nc.subscribe(self.subject, cb=on_message)
        try:
            while True:
                wake.clear()  # before reading: a message stored during the read wakes the next one
                found = await self.read(self.position)
                if found:
                    batch = [self.show(stored) for stored in found]
                    size = sum(len(shown.frame) for shown in batch)
                    # handed out at once with the position's move (no await between): a queue
                    # that joins sees either both or neither
                    self.position = found[-1].seq
                    for queue in self.queues:
                        queue.offer(batch, size)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.readers.idle_s):
                        await wake.wait()
        except Exception as exc:  # (JetStream unreachable, ...): each client ends with it, as its own read would
            self.readers.ended(self)
            for queue in self.queues:
                queue.fail(exc)
        finally:
            await unsubscribed(sub)


class SharedReaders:
    """The shared readers of a process, by subject (`follow` is how a client uses them)."""

    def __init__(self, nc: Client, idle_s: float = 15.0):
        self.nc = nc
        self.idle_s = idle_s  # how long a reader waits for a wake-up before it reads anyway
        self.readers: dict[str, _Reader] = {}

    def ended(self, reader: _Reader) -> None:
        """`reader` stopped (an error): the next client starts another."""
        if self.readers.get(reader.subject) is reader:
            del self.readers[reader.subject]

    def _join(self, subject: str, read: Read, show: Show, live_from: int, wanted: Wanted) -> tuple[_Reader, _Queue]:
        reader = self.readers.get(subject)
        if reader is None:
            reader = self.readers[subject] = _Reader(self, subject, read, show, live_from)
        queue = _Queue(wanted)
        reader.queues.add(queue)
        return reader, queue

    def _leave(self, reader: _Reader, queue: _Queue) -> None:
        reader.queues.discard(queue)
        if not reader.queues and self.readers.get(reader.subject) is reader:
            del self.readers[reader.subject]
            reader.task.cancel()

    async def stop(self) -> None:
        """End every reader, and its clients' feeds (the HTTP server's stop ends their streams
        first, as a rule)."""
        readers = list(self.readers.values())
        self.readers.clear()
        for reader in readers:
            reader.task.cancel()
            for queue in reader.queues:
                queue.fail(_Stopped())
        await asyncio.gather(*(reader.task for reader in readers), return_exceptions=True)

    async def follow(
        self,
        subject: str,
        read: Read,
        show: Show,
        live_from: int,
        after_seq: int,
        idle_s: float,
        wanted: Wanted = None,
        until_terminal: bool = False,
    ) -> AsyncGenerator[list[Shown] | None, None]:
        """The events stored on `subject` after `after_seq` that are `wanted`, in stream order,
        each once, in batches: what a client missed read by itself (`read`, a page at a time),
        then live from the subject's shared reader (started at `live_from` if there is none
        yet). Yields None at once if the first step finds nothing (the feed is open), and after
        `idle_s` without an event (a keep-alive). With `until_terminal` it ends after the first
        terminal event; it also ends when the readers stop."""
        client = _Client(read, show, wanted, until_terminal, after_seq)
        while not client.ended:
            reader, queue = self._join(subject, read, show, live_from, wanted)
            try:
                # behind what the shared reader handed out before the joining: read it by itself
                joined_at = reader.position
                while not client.ended and client.last < joined_at:
                    if (batch := await client.page()) is None:
                        break
                    if batch:
                        yield batch
                if not client.opened and not client.ended:
                    client.opened = True
                    yield None
                while not client.ended:
                    taken = await queue.take(idle_s)
                    if taken is None:
                        yield None
                    elif batch := client.sent(taken):
                        yield batch
            except _Behind:
                pass  # join again, then read by itself from its last event
            except _Stopped:
                return
            finally:
                self._leave(reader, queue)


async def stored_only(read: Read, show: Show, after_seq: int) -> AsyncIterator[list[Shown]]:
    """What `follow` yields of an ended execution (`read` by itself, no shared reader, up to its
    terminal event)."""
    client = _Client(read, show, None, True, after_seq)
    while not client.ended and (batch := await client.page()) is not None:
        if batch:
            yield batch


class _Client:
    """Where one client is: the last sequence it read or was handed, whether it has yielded yet
    and whether it has ended (after a terminal event, with `until_terminal`)."""

    def __init__(self, read: Read, show: Show, wanted: Wanted, until_terminal: bool, last: int):
        self.read = read
        self.show = show
        self.wanted = wanted
        self.until_terminal = until_terminal
        self.last = last
        self.opened = False
        self.ended = False

    async def page(self) -> list[Shown] | None:
        """The wanted events of the next page it reads by itself after its last event (None: the
        stream has none after it)."""
        found = await self.read(self.last)
        if not found:
            return None
        self.last = found[-1].seq
        batch = self._through_terminal([s for s in map(self.show, found) if self.wanted is None or self.wanted(s)])
        if batch:
            self.opened = True
        return batch

    def sent(self, taken: list[Shown]) -> list[Shown]:
        """What it sends of what the shared reader handed it: what it has not sent yet."""
        batch = self._through_terminal([s for s in taken if s.seq > self.last])
        if batch:
            self.last = batch[-1].seq
        return batch

    def _through_terminal(self, batch: list[Shown]) -> list[Shown]:
        """`batch` up to its terminal event, if it ends there (and then the client has ended)."""
        if self.until_terminal:
            for index, shown in enumerate(batch):
                if is_terminal(shown.event):
                    self.ended = True
                    return batch[: index + 1]
        return batch
