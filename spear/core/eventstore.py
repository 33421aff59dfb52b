"""What the service and the worker need from an event store, as a Protocol, and the store's errors.

The JetStream store (`spear.jetstream.store`) is the real one; `spear.core.memstore` keeps events
in memory with the same semantics, so decisions can be tested without a server. Store errors are
the store's own: the adapters map them to API errors (`spear.api.errors`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from spear.core.events import AnyEvent, Event


class Appended(NamedTuple):
    """Where an append landed; `duplicate`: the same msg id was stored before, nothing was added."""

    seq: int
    duplicate: bool


class Stored(NamedTuple):
    """A stored event and its stream sequence."""

    event: AnyEvent
    seq: int


class StoreError(Exception):
    """The store did not do what was asked (base of the store's errors)."""


class StoreUnavailable(StoreError):
    """The store did not answer in time or is not reachable: trying again later may work."""


class StoreNotReached(StoreUnavailable):
    """Nothing took the append, each time it was sent (no responders: the stream has no leader,
    or JetStream is down): it was surely not stored, unlike a store that did not answer."""


class StoreFull(StoreError):
    """The store has no room left: it refuses appends until some is freed (retention, a bigger
    limit). Trying again later may work; at once, it will not."""


class AppendConflict(StoreError):
    """The execution has events this append did not expect (another writer got there first)."""

    def __init__(self, description: str, last_seq: int | None = None):
        super().__init__(description)
        self.last_seq = last_seq


class EventStore(Protocol):
    """The log of executions: appends guarded by expected last sequence and message id, and reads."""

    full_at: float | None  # (time.monotonic) when it last refused an append for lack of room: StoreFull

    async def append(
        self,
        event: Event,
        *,
        expect_last_seq: int | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        expect_last_msg_id: str | None = None,
    ) -> Appended:
        """Store one event of its execution.

        `expect_last_seq`: the sequence of the execution's last event this append is based on (0:
        none yet); otherwise AppendConflict. `msg_id`: a repeat of an id stored within the dedupe
        window stores nothing and says `duplicate`. `headers` travel with the event (traceparent).
        `expect_last_msg_id`: the store's newest message (of any execution) must be the one
        stored with this message id; otherwise AppendConflict (so an append sent right behind
        another, before its acknowledgement, is fenced on it).
        """
        ...

    async def append_batch(
        self, events: list[Event], *, expect_last_seq: int, headers: dict[str, str] | None = None
    ) -> Appended:
        """Store several events of one execution, in order, all or none, fenced on
        `expect_last_seq` like one append; the result names the last one."""
        ...

    async def append_chain(
        self,
        events: list[Event],
        *,
        expect_last_seq: int,
        msg_ids: list[str],
        headers: dict[str, str] | None = None,
    ) -> Appended:
        """Store events of one execution in order, sent back to back without waiting: the first
        fenced on `expect_last_seq`, each next one on its predecessor being the store's newest
        message (`msg_ids` name them all, the last may be ""). Only the last is acknowledged:
        its Appended (those before it sit right before it); AppendConflict if it was refused,
        and then any prefix of them may be stored (read the execution's last event)."""
        ...

    async def last(self, execution_id: str) -> Stored | None:
        """The execution's newest stored event, or None if it has none."""
        ...

    async def last_of_kind(self, execution_id: str, kind: str) -> Stored | None:
        """The execution's newest stored event of `kind`, or None if it has none."""
        ...

    async def history(self, execution_id: str, after_seq: int = 0) -> list[Stored]:
        """The execution's stored events after `after_seq`, in order."""
        ...

    async def history_page(
        self, execution_id: str, after_seq: int = 0, max_bytes: int = 4 << 20
    ) -> tuple[list[Stored], bool]:
        """The first of `history`'s events after `after_seq`, about `max_bytes` of them (at least
        one), and whether more follow."""
        ...
