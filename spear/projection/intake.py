"""The projection's intake: stored events as they arrive, grouped into batches with a bounded linger.

An execution's events arrive a few milliseconds apart (`requested`, `started`, its end); folded in
one batch they make one state write instead of three. So a batch closes when it is full or
`linger_s` after its first event arrived, whichever comes first: no event waits longer than the
linger (plus the time the batch before it takes to write). It does not close early when every
execution in it has ended: sequential SYNC calls then made a batch each (a state write, three acks
and a pull request per call, between the call's own appends); lingering, the calls of the linger
share one (docs/performance.md, fifth round).
"""

from __future__ import annotations

import asyncio

from spear.core.events import AnyEvent, BadEvent, decode_event
from spear.jetstream.pull import Delivery, stream_sequence


class Arrived:
    """One delivered message: its event (or why it cannot be read) and its stream sequence."""

    __slots__ = ("event", "msg", "seq")

    def __init__(self, event: AnyEvent | BadEvent, seq: int, msg: Delivery):
        self.event = event
        self.seq = seq
        self.msg = msg


class Intake:
    """Collects arriving events; `next_batch()` hands them over once the batch may close."""

    def __init__(self, linger_s: float, full: int):
        self.linger_s = linger_s
        self.full = full
        self.pending: list[Arrived] = []
        self.opened_at = 0.0  # (loop time) when the first of `pending` arrived
        self._lingered = False  # the first pending event has waited linger_s
        self._timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self.pending)

    def receive(self, msg: Delivery) -> None:
        """A message delivered by the consumer (called from its callback, never blocks)."""
        event: AnyEvent | BadEvent
        try:
            event = decode_event(msg.data, msg.subject)
        except BadEvent as exc:
            event = exc
        if not self.pending:  # a batch opens: its linger starts now
            self.opened_at = asyncio.get_running_loop().time()
            self._lingered = self.linger_s <= 0
            if not self._lingered:
                self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._linger_over)
        self.pending.append(Arrived(event, stream_sequence(msg), msg))
        if self._ready():
            self._wake_up()

    def hurry(self) -> None:
        """Close the batch now, and every next one as soon as an event is in (the projection is
        stopping: what it holds is applied without lingering)."""
        self.linger_s = 0.0
        self._lingered = True
        self._wake_up()

    def _linger_over(self) -> None:
        self._lingered = True
        self._wake_up()

    def _ready(self) -> bool:
        """Something waits, and it has waited the linger, or the batch is full."""
        return bool(self.pending) and (self._lingered or len(self.pending) >= self.full)

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def next_batch(self) -> list[Arrived]:
        """Every event waiting, once the batch may close (see the module's docstring)."""
        while not self._ready():
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        batch, self.pending = self.pending, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return batch
