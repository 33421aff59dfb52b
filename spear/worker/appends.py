"""A running attempt's own appends, `log` events (log lines, progress) and `chunk` events (what a
streaming function yields), kept in order and fenced like every other append.

The function reports and yields from its thread or coroutine; one writer appends what is queued,
each append naming the sequence of the attempt's previous event, so the attempt's terminal event
can name the last one. What piles up while an append is in flight goes out next as one JetStream
atomic batch (all or nothing, fenced on its first event): a fast generator costs one round trip
per batch, not per item, and nothing is lost or reordered. A progress report not yet stored is
dropped when a newer one comes with no log line between them (the newest stands last). A conflict
(a cancel request, a newer attempt) ends the writing and cancels the function; the terminal
append then meets the same conflict and resolves it. A chunk that cannot be stored for another
reason fails the attempt (it is redelivered); a log line that cannot be stored is only logged.

Until the attempt's `started` is stored the writer is *held*. `started` comes before the call of
any function but an inline one, which runs first: what it logged is stored once the worker has
stored its `started` after it (`spear.worker.worker`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from spear.core.events import Chunk, Event, Logged, Requested, envelope
from spear.core.eventstore import AppendConflict, Appended, StoreError
from spear.core.jsonlimits import JsonRejected, encode_storable
from spear.worker.context import Context, ExecutionCancelled, NonRetryableError, ResultNotSerializable

log = logging.getLogger(__name__)

Append = Callable[..., Awaitable[Appended]]
AppendBatch = Callable[..., Awaitable[Appended]]

MAX_BATCH = 500  # events in one atomic batch (the server's limit is 1000; more gained nothing here)
MAX_BATCH_BYTES = 1 << 20  # and their size: a batch is held by the server until it commits
ENVELOPE_ESTIMATE = 256  # an event's fields and headers around its data
MAX_PENDING_CHUNKS = 2048  # a generator that runs ahead of its appends waits here
MAX_PENDING_BYTES = 8 << 20  # or as soon as its chunks not yet stored come to this many bytes


class ChunkTooLarge(NonRetryableError):
    """A streaming function yielded an item too large for an event: the execution fails."""


class PendingRoom:
    """How many chunks, and bytes of them, are handed in and not yet stored: a generator that runs
    ahead of its appends waits once either bound is reached (one chunk always fits), so a worker
    holds at most ~MAX_PENDING_BYTES of a stream however large its items. Taken from the
    generator's thread or coroutine, given back on the loop."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.chunks = 0
        self.bytes = 0

    def take(self, size: int, timeout: float = 0.0) -> bool:
        """Room for a chunk of `size` bytes, waiting up to `timeout` seconds for it; False if none."""
        with self._changed:
            if not self._fits(size) and timeout > 0:
                self._changed.wait(timeout)
            if not self._fits(size):
                return False
            self.chunks += 1
            self.bytes += size
            return True

    def give_back(self, chunks: list[Chunk]) -> None:
        """These chunks are stored (or dropped): their room is free again."""
        if not chunks:
            return
        with self._changed:
            self.chunks -= len(chunks)
            self.bytes -= sum(_size(chunk) for chunk in chunks)
            self._changed.notify_all()

    def _fits(self, size: int) -> bool:
        return self.chunks == 0 or (self.chunks < MAX_PENDING_CHUNKS and self.bytes + size <= MAX_PENDING_BYTES)


def _size(chunk: Chunk) -> int:
    return len(chunk.data) if isinstance(chunk.data, msgspec.Raw) else 0


class AttemptAppends:
    """The ordered, fenced writer of one attempt's `log` and `chunk` events."""

    def __init__(
        self,
        append: Append,
        append_batch: AppendBatch,
        request: Requested,
        ctx: Context,
        last_seq: int | None,
        max_chunk_bytes: int,
    ):
        """`last_seq`: of the attempt's `started`; None while it is not stored yet (held)."""
        self.append = append
        self.append_batch = append_batch
        self.request = request
        self.ctx = ctx
        self.attempt = ctx.attempt
        self.last_seq = last_seq or 0  # of this attempt's newest stored event
        self.held = last_seq is None  # `started` not stored yet: nothing may be written
        self.max_chunk_bytes = max_chunk_bytes
        self.loop = asyncio.get_running_loop()
        self.error: BaseException | None = None  # a chunk that could not be stored
        self._queue: list[Event] = []  # log lines, progress reports and chunks, in the order they came
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._next_seq = 0
        self._items = 0  # chunks handed in so far (a thread's may not be queued yet): names a refused one
        self._thread = threading.get_ident()  # the loop's: reports made on it are queued at once

    @functools.cached_property
    def _room(self) -> PendingRoom:
        """Chunks queued and not yet stored: made by the first chunk (only generators need it; the
        one thread that yields them gets here first, so it is made once)."""
        return PendingRoom()

    # --- from the function's side ----------------------------------------------------------------

    def report(self, progress: float | None, message: str, at: str | None = None) -> None:
        """From any thread: queue a log line (progress None) or a progress report, made now or
        at `at`. On the loop's own thread it is queued at once, so it precedes the end of the
        function that made it."""
        if threading.get_ident() == self._thread:
            self._queue_report(progress, message, at)
        else:
            self.loop.call_soon_threadsafe(self._queue_report, progress, message, at)

    def chunk_from_thread(self, item: Any) -> None:
        """From a generator's thread: queue one chunk, waiting while too many are not stored yet."""
        data = self._encode(item)
        while not self._room.take(len(data), timeout=0.1):
            self._check_open()
        self._check_open()
        self.loop.call_soon_threadsafe(self._queue_chunk, data)

    async def chunk(self, item: Any) -> None:
        """From a coroutine on the loop: queue one chunk, waiting while too many are not stored yet."""
        data = self._encode(item)
        while not self._room.take(len(data)):
            self._check_open()
            await asyncio.sleep(0.005)
        self._check_open()
        self._queue_chunk(data)

    def _encode(self, item: Any) -> msgspec.Raw:
        self._check_open()
        seq, self._items = self._items, self._items + 1  # (probe19: a thread's refused item was named chunk 0)
        try:
            data = encode_storable(item)
        except JsonRejected as exc:
            raise ResultNotSerializable(f"chunk {seq} cannot be stored as JSON: {exc}") from None
        if len(data) > self.max_chunk_bytes:
            raise ChunkTooLarge(
                f"chunk {seq} is {len(data)} bytes, more than the {self.max_chunk_bytes} an event can carry"
            )
        return msgspec.Raw(data)

    def _check_open(self) -> None:
        if self._closed or self.ctx.cancelled:
            raise ExecutionCancelled(f"execution {self.request.execution_id} stopped streaming")

    # --- on the loop -------------------------------------------------------------------------------

    def _queue_report(self, progress: float | None, message: str, at: str | None = None) -> None:
        if self._closed:
            return
        event = Logged(**envelope(self.request, self.attempt, at), message=message, progress=progress)
        if progress is not None:
            self._drop_superseded_report()
        self._queue.append(event)
        self._wake()

    def _drop_superseded_report(self) -> None:
        """A new progress report makes the last one not yet stored needless, unless a log line
        came after it (it stays, to keep its place among log lines); chunks between them do not
        keep it (a generator reporting each item would store a report per chunk)."""
        for index in range(len(self._queue) - 1, -1, -1):
            queued = self._queue[index]
            if isinstance(queued, Logged):
                if queued.progress is not None:
                    del self._queue[index]
                return

    def _queue_chunk(self, data: msgspec.Raw) -> None:
        chunk = Chunk(**envelope(self.request, self.attempt), seq=self._next_seq, data=data)
        if self._closed:
            self._room.give_back([chunk])
            return
        self._queue.append(chunk)
        self._next_seq += 1
        self._wake()

    def _wake(self) -> None:
        if self.held:  # (until `started` is stored: `begin`)
            return
        if self._writer is None or self._writer.done():
            self._writer = self.loop.create_task(self._write())

    def begin(self, started_seq: int) -> None:
        """`started` is stored at `started_seq`: write what is queued, fenced on it."""
        self.held = False
        self.last_seq = started_seq
        if self._queue:
            self._wake()

    @property
    def quiet(self) -> bool:
        """Held, with nothing queued: the attempt's end can follow `started` directly."""
        return self.held and not self._queue

    async def _write(self) -> None:
        while not self._closed and self._queue:
            taken = _batch_length(self._queue)
            batch, self._queue = self._queue[:taken], self._queue[taken:]
            chunks = [event for event in batch if isinstance(event, Chunk)]
            try:
                self.last_seq = (await self._store(batch)).seq
            except AppendConflict:
                self._close()
            except Exception as exc:
                if chunks:  # a stream with a hole is worse than a retried attempt
                    log.error("worker: chunks of %s not stored: %s", self.request.execution_id, exc)
                    self.error = exc
                    self._close()
                else:  # a log line is not worth failing the execution for
                    log.warning("worker: log of %s not stored: %s", self.request.execution_id, exc)
            finally:
                self._room.give_back(chunks)

    async def _store(self, batch: list[Event]) -> Appended:
        if len(batch) == 1:
            return await self.append(batch[0], expect_last_seq=self.last_seq)
        try:
            return await self.append_batch(batch, expect_last_seq=self.last_seq)
        except StoreError as exc:  # say, too many batches in flight on the server: one at a time
            log.debug("worker: batch of %d refused (%s); appending one by one", len(batch), exc)
            for event in batch:
                self.last_seq = (await self.append(event, expect_last_seq=self.last_seq)).seq
            return Appended(self.last_seq, False)

    def _close(self) -> None:
        self._closed = True
        self.ctx.cancel()  # the function stops at its next yield or `ctx.cancelled` check
        self._room.give_back([event for event in self._queue if isinstance(event, Chunk)])
        self._queue.clear()

    def take_held(self) -> list[Event]:
        """What a held writer queued, in the order the worker would store it, for a caller that
        stores them itself with the attempt's `started` and end (`spear.service.inline`). Takes
        nothing more after."""
        events = list(self._queue)
        self._queue.clear()
        self._closed = True
        return events

    async def close(self) -> int:
        """Store what is queued, stop taking more, and return the newest sequence. Raises what kept
        a chunk from being stored."""
        await asyncio.sleep(0)  # reports scheduled from the function's thread arrive first
        while self._writer is not None and not self._writer.done():
            await self._writer
            await asyncio.sleep(0)
        self._closed = True
        if self.error is not None:
            raise self.error
        return self.last_seq


def _batch_length(queue: list[Event]) -> int:
    """How many of the queued events go in the next batch: at least one, at most MAX_BATCH events
    and (past the first) MAX_BATCH_BYTES of data."""
    size = 0
    for count, event in enumerate(queue[:MAX_BATCH]):
        size += ENVELOPE_ESTIMATE + (
            len(event.data) if isinstance(event, Chunk) and isinstance(event.data, msgspec.Raw) else 0
        )
        size += len(event.message) if isinstance(event, Logged) else 0
        if count and size > MAX_BATCH_BYTES:
            return count
    return min(len(queue), MAX_BATCH)
