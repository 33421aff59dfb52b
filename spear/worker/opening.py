"""An attempt's opening: its `started` event, stored alone before the function is called (then
in-progress acks while it runs) or, for an inline function that logged nothing, chained with the
attempt's end in one round trip."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Protocol

from spear.aio import quietly
from spear.core.events import Event, Started
from spear.core.eventstore import AppendConflict, Appended, EventStore, Stored
from spear.jetstream import hpub
from spear.jetstream.pull import Delivery
from spear.worker.appends import AttemptAppends


class Append(Protocol):
    """The worker's append (under the delivery's span)."""

    def __call__(
        self, event: Event, *, expect_last_seq: int | None = None, msg_id: str | None = None
    ) -> Awaitable[Appended]:
        """Store `event` (fenced and deduplicated as asked)."""
        ...


def started_msg_id(started: Started, last_seq: int) -> str:
    """The message id of an attempt's `started` that follows the event at `last_seq`."""
    return f"{started.execution_id}:started:{started.attempt}:{last_seq}"


class Opening:
    """An attempt's `started`, stored before the function is called (an inline function's: after
    it, if it logged): alone, fenced on the event before it, and the attempt's held appends begin
    after it, and from then on in-progress acks tell JetStream the invocation is being worked on
    (so only a lost worker's is redelivered). An inline function's that logged nothing goes with
    its end instead."""

    def __init__(
        self,
        append: Append,
        store: EventStore,
        msg: Delivery,
        started: Started,
        last_seq: int,
        appends: AttemptAppends,
        beat_every_s: float,
    ):
        self.append = append  # the worker's: under the delivery's span
        self.store = store
        self.beat_every_s = beat_every_s
        self.msg = msg
        self.started = started
        self.last_seq = last_seq  # of the event `started` follows
        self.appends = appends
        self.started_seq: int | None = None  # once `started` is stored
        self.tries = 0  # of `begin`
        self.msg_id = ""
        self.follow(last_seq)  # the sequence in its id too: a released attempt starts again under its number
        self._beats: InProgress | None = None

    def follow(self, last_seq: int) -> None:
        """`started` is to follow the event at `last_seq` instead."""
        self.last_seq = last_seq
        self.msg_id = started_msg_id(self.started, last_seq)

    async def begin(self, beat: bool = True) -> None:
        """Store `started` (AppendConflict if the execution moved on, or it was started elsewhere).
        Asked again after an append that got no answer (it may have been stored: then its fence
        refuses it, or its id makes it a duplicate), this very `started` found as the execution's
        last event counts as stored."""
        self.tries += 1
        try:
            appended = await self.append(self.started, expect_last_seq=self.last_seq, msg_id=self.msg_id)
            seq = None if appended.duplicate else appended.seq
        except AppendConflict:
            if self.tries == 1:
                raise
            seq = None
        if seq is None:
            seq = await self._stored_before()
            if seq is None:
                raise AppendConflict("this attempt was started elsewhere, or its execution moved on")
        self.started_seq = seq
        self.appends.begin(seq)
        if beat:
            self._beats = InProgress(self.msg, self.beat_every_s)

    async def _stored_before(self) -> int | None:
        """After a try that got no answer: the sequence of this `started`, if it is the
        execution's last event."""
        if self.tries == 1:
            return None
        last = await self.store.last(self.started.execution_id)
        return last.seq if last is not None and last.event == self.started else None

    async def with_end(self, end: Event, msg_id: str | None) -> None:
        """Store `started` and the attempt's `end` in one round trip, as a chain (the store's
        `append_chain`): `started` fenced on the event before it as always, not acknowledged;
        `end` fenced on `started` being the stream's newest message, a stricter fence than its
        sequence, which is not known yet. AppendConflict: the end was refused, and whether
        `started` was stored is for the caller to read (`Opening.found`)."""
        appended = await self.store.append_chain(
            [self.started, end], expect_last_seq=self.last_seq, msg_ids=[self.msg_id, msg_id or ""]
        )
        self.started_seq = appended.seq - 1  # right before its end: nothing came between

    def found(self, last: Stored) -> bool:
        """Whether `last`, the execution's last event after a refused chain, is this `started`
        (stored, with the end refused: another execution's event came between, or junk)."""
        if self.started_seq is None and last.event == self.started:
            self.started_seq = last.seq
        return self.started_seq is not None

    def stop(self) -> None:
        """The attempt ended: no more in-progress acks."""
        if self._beats is not None:
            self._beats.stop()


class InProgress:
    """In-progress acks (`+WPI`) for a message every `every_s` until `stop()`.

    A timer, not a task: most attempts end long before their first beat, and a task made and
    cancelled per attempt cost more than the timer. Each beat is queued from the timer's
    callback; `stop()` cancels the next one, so no beat goes out after it (a beat that went on
    would keep refreshing the ack timer of an invocation handed back, nak, which would then
    never be redelivered)."""

    def __init__(self, msg: Delivery, every_s: float):
        self.msg = msg
        self.every_s = every_s
        self.stopped = False
        self._loop = asyncio.get_running_loop()
        self._next = self._loop.call_later(every_s, self._beat)

    def _beat(self) -> None:
        if self.stopped or self.msg.acked:
            return
        with contextlib.suppress(Exception):  # (the connection closed or reconnecting: the next beat tries again)
            if not hpub.publish_now(self.msg.nc, self.msg.reply, b"+WPI"):
                self._loop.create_task(quietly(self.msg.in_progress()))
        self._next = self._loop.call_later(self.every_s, self._beat)

    def stop(self) -> None:
        """No more in-progress acks."""
        self.stopped = True
        self._next.cancel()
