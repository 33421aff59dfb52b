"""Gateway-run invocations settled together: the ends of several deliveries read in one request.

A SYNC call of an inline function is run by the gateway (`spear.service.inline`), which stores
`requested`, `started` and the end as one chain; the worker still receives `requested` and may
acknowledge it only once it sees the end stored. Read one by one, that is a direct get and an ack
per call: two writes and two wake-ups of the worker, a request for nats-server to answer. Here
the deliveries that arrive within WINDOW_S of the first share one read: a multi-last direct get
(`multi_last`: the newest message of each subject of each execution, in stream order, then an
end-of-batch status), answered in one burst, after which their acks go out together.

Only what the read proves counts: an execution whose newest message is a readable terminal event
(stored, since a server returned it, and never followed by another: one end per execution). Any
other outcome (the end not stored yet, an unreadable message, a cut-off or refused read, a
timeout) settles nothing, and the worker reads that execution the usual way.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client

from spear.core.events import BadEvent, decode_event, is_terminal
from spear.core.eventstore import Stored
from spear.core.names import Names
from spear.jetstream.rawsub import RawSubscription, subscribe_raw

log = logging.getLogger(__name__)

WINDOW_S = 0.02  # how long the first delivery of a batch waits for others
MAX_EXECUTIONS = 64  # per read: a full batch is read at once
RESULTS_PER_EXECUTION = 16  # newest messages asked for per execution (one per event kind it has)


class _Read:
    """One multi-last read in flight: the messages that came back, until its status line."""

    __slots__ = ("done", "found")

    def __init__(self, done: asyncio.Future[bool]):
        self.done = done  # True: the batch ended with nothing left out
        self.found: list[tuple[bytes, int, bytes]] = []  # subject, sequence, payload


class Settler:
    """Reads the last events of gateway-run executions in batches (see the module's docstring)."""

    def __init__(self, nc: Client, names: Names, timeout_s: float):
        self.nc = nc
        self.names = names
        self.timeout_s = timeout_s
        self._inbox = nc.new_inbox()
        self._sub: RawSubscription | None = None
        self._waiting: dict[str, list[asyncio.Future[Stored | None]]] = {}  # execution id -> its callers
        self._timer: asyncio.TimerHandle | None = None
        self._reads: dict[bytes, _Read] = {}  # reply subject -> read
        self._count = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._batches: list[dict[str, list[asyncio.Future[Stored | None]]]] = []  # handed to jobs

    async def ended(self, execution_id: str) -> Stored | None:
        """The execution's terminal event, if its newest message is one; None if the batch read
        shows no end (or says nothing): then read it the usual way."""
        if self._sub is None:
            self._sub = await subscribe_raw(self.nc, f"{self._inbox}.*", self._arrived)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Stored | None] = loop.create_future()
        self._waiting.setdefault(execution_id, []).append(future)
        if len(self._waiting) >= MAX_EXECUTIONS:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(WINDOW_S, self._flush)
        return await future

    async def stop(self) -> None:
        """Stop reading; callers still waiting read the usual way (answered None, at once: a job
        cancelled before it began would not answer them)."""
        self._flush()
        for job in list(self._jobs):
            job.cancel()
        for batch in self._batches:
            _answer(batch, {})
        self._batches.clear()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiting:
            return
        batch, self._waiting = self._waiting, {}
        self._batches.append(batch)
        job = asyncio.get_running_loop().create_task(self._settle(batch))
        self._jobs.add(job)  # held until done: the loop keeps only weak references to tasks
        job.add_done_callback(self._jobs.discard)

    async def _settle(self, batch: dict[str, list[asyncio.Future[Stored | None]]]) -> None:
        ended: dict[str, Stored] = {}
        try:
            ended = await self._read(list(batch))
        except Exception as exc:  # the usual reads decide, and report what is wrong
            log.debug("worker: batched read of %d executions failed: %s", len(batch), exc)
        finally:
            _answer(batch, ended)
            if batch in self._batches:
                self._batches.remove(batch)

    async def _read(self, execution_ids: list[str]) -> dict[str, Stored]:
        """The executions whose newest stored message is a readable terminal event."""
        self._count += 1
        reply = f"{self._inbox}.{self._count}"
        read = _Read(asyncio.get_running_loop().create_future())
        self._reads[reply.encode()] = read
        request = {
            "multi_last": [self.names.execution_events(execution_id) for execution_id in execution_ids],
            "batch": RESULTS_PER_EXECUTION * len(execution_ids),
        }
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{self.names.stream}", msgspec.json.encode(request), reply=reply)
            async with asyncio.timeout(self.timeout_s):
                complete = await read.done
        finally:
            self._reads.pop(reply.encode(), None)
        if not complete:
            return {}
        newest: dict[str, tuple[bytes, int, bytes]] = {}
        for found in read.found:
            execution_id = self.names.event_execution_id(found[0].decode())
            if execution_id not in newest or found[1] > newest[execution_id][1]:
                newest[execution_id] = found
        ended: dict[str, Stored] = {}
        for execution_id, (subject, seq, data) in newest.items():
            try:
                event = decode_event(data, subject.decode())
            except BadEvent:
                continue
            if is_terminal(event) and event.execution_id == execution_id:
                ended[execution_id] = Stored(event, seq)
        return ended

    def _arrived(self, subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        # Called inside the connection's read loop (`rawsub.py`): nothing here may block or raise.
        read = self._reads.get(subject)
        if read is None or read.done.done():
            return
        if not data and block[8:9] == b" ":  # a status line: the end of the batch, or a refusal
            status = block[9:12]
            complete = status == b"404" or (status == b"204" and _header(block, b"Nats-Num-Pending") == b"0")
            read.done.set_result(complete)
            return
        stored_subject, seq = _header(block, b"Nats-Subject"), _header(block, b"Nats-Sequence")
        if stored_subject is None or seq is None or not seq.isdigit():
            read.done.set_result(False)  # not a stored message as a direct get returns it
            return
        read.found.append((stored_subject, int(seq), data))


def _header(block: bytes, name: bytes) -> bytes | None:
    """The value of header `name` in a header block; its last line, as nats-py's parse keeps the
    last (the server adds its own after the headers a message was stored with)."""
    start = block.rfind(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = block.find(b"\r\n", start)
    return block[start : end if end >= 0 else len(block)].strip()


def _answer(batch: dict[str, list[asyncio.Future[Stored | None]]], ended: dict[str, Stored]) -> None:
    """Answer the batch's callers that still wait: each its execution's end, or None."""
    for execution_id, futures in batch.items():
        for future in futures:
            if not future.done():
                future.set_result(ended.get(execution_id))
