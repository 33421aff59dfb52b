"""An EventStore in memory, with the JetStream store's semantics, for tests of decisions.

One sequence counts across all executions, as a stream's does. A message id stored before is a
duplicate (acknowledged with the first one's sequence, nothing stored), checked before the
expected last sequence, as JetStream does; the expected last sequence is over all of the
execution's events (0: it has none); the expected last message id is that of the newest stored
event of any execution (None if it had none). A batch is checked as a whole and stored whole or not at all.
Unlike JetStream, ids are remembered for ever (no dedupe window). Pure: no I/O.
"""

from __future__ import annotations

from spear.core.events import AnyEvent, Event
from spear.core.eventstore import AppendConflict, Appended, Stored


class MemoryEventStore:
    """The EventStore protocol (`spear.core.eventstore`) over a list."""

    def __init__(self) -> None:
        self.seq = 0
        self.events: dict[str, list[Stored]] = {}  # execution id -> its events in order
        self.headers: dict[int, dict[str, str]] = {}  # sequence -> the headers it was stored with
        self._ids: dict[str, int] = {}  # message id -> sequence
        self._last_id: str | None = None  # message id of the newest stored event
        self.full_at: float | None = None  # a list has room for everything

    async def append(
        self,
        event: Event,
        *,
        expect_last_seq: int | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        expect_last_msg_id: str | None = None,
    ) -> Appended:
        """Store one event, unless its message id was stored before or the execution moved on."""
        if msg_id is not None and msg_id in self._ids:
            return Appended(self._ids[msg_id], True)
        self._check(event.execution_id, expect_last_seq)
        if expect_last_msg_id is not None and expect_last_msg_id != self._last_id:
            raise AppendConflict(f"wrong last msg ID: {self._last_id or ''}")
        seq = self._store(event, headers)
        if msg_id is not None:
            self._ids[msg_id] = seq
        self._last_id = msg_id
        return Appended(seq, False)

    async def append_batch(
        self, events: list[Event], *, expect_last_seq: int, headers: dict[str, str] | None = None
    ) -> Appended:
        """Store `events` (of one execution) in order, all or none."""
        self._check(events[0].execution_id, expect_last_seq)
        seq = 0
        for event in events:
            seq = self._store(event, headers)
        self._last_id = None
        return Appended(seq, False)

    async def append_chain(
        self,
        events: list[Event],
        *,
        expect_last_seq: int,
        msg_ids: list[str],
        headers: dict[str, str] | None = None,
    ) -> Appended:
        """Store `events` one after the other, each next fenced on the one before being the
        newest; only the last one's refusal is raised."""
        appended = Appended(0, False)
        for index, event in enumerate(events):
            msg_id = msg_ids[index] or None
            try:
                if index == 0:
                    appended = await self.append(event, expect_last_seq=expect_last_seq, msg_id=msg_id, headers=headers)
                else:
                    appended = await self.append(
                        event, expect_last_msg_id=msg_ids[index - 1], msg_id=msg_id, headers=headers
                    )
            except AppendConflict:
                if index == len(events) - 1:
                    raise
        return appended

    async def last(self, execution_id: str) -> Stored | None:
        """The execution's newest event."""
        stored = self.events.get(execution_id)
        return stored[-1] if stored else None

    async def last_of_kind(self, execution_id: str, kind: str) -> Stored | None:
        """The execution's newest event of `kind`."""
        return next((s for s in reversed(self.events.get(execution_id, [])) if s.event.kind == kind), None)

    async def history(self, execution_id: str, after_seq: int = 0) -> list[Stored]:
        """The execution's events after `after_seq`."""
        return [s for s in self.events.get(execution_id, []) if s.seq > after_seq]

    async def history_page(
        self, execution_id: str, after_seq: int = 0, max_bytes: int = 4 << 20
    ) -> tuple[list[Stored], bool]:
        """The whole history is one page here (it is in memory already)."""
        return await self.history(execution_id, after_seq), False

    def _check(self, execution_id: str, expect_last_seq: int | None) -> None:
        if expect_last_seq is None:
            return
        stored = self.events.get(execution_id)
        last = stored[-1].seq if stored else 0
        if last != expect_last_seq:
            raise AppendConflict(f"wrong last sequence: {last}", last)

    def _store(self, event: Event, headers: dict[str, str] | None) -> int:
        assert isinstance(event, AnyEvent)  # an Event subclass of the log's vocabulary
        self.seq += 1
        self.events.setdefault(event.execution_id, []).append(Stored(event, self.seq))
        self.headers[self.seq] = dict(headers or {})
        return self.seq
