"""Invocations cancelled while they waited in a task's ASYNC queue, for admission (admission.py).

A pending execution that is cancelled gets its `cancelled` event at once and never starts, but
its `requested` stays in the worker consumer's `num_pending` until a worker passes it: with the
workers busy or absent, cancelling a backlog made no room (probe29). Admission leaves those out.

They are read from the log, and only when a queue looks full: the task's `cancelled` events stored
after the last read (and after the consumer's last delivery), then of those the executions whose
`requested` comes after that delivery too (one multi-get: one cancelled while a worker held it, or
between attempts, was delivered and waits in no queue). Each `cancelled` is read once (review27:
every refusal read them all again); what is kept is the stream sequences of those `requested`
events, dropped as the consumer delivers past them, and all of it when the consumer or the stream
is made anew (sequences start again). A read also checks that what is kept is still stored
(review28): a `requested` removed from the log (retention, a task deleted with its executions, a
stream made anew unseen) no longer counts in JetStream's figure, so it is not to be left out of it
again; and the last `cancelled` read is still where it was, else they are read again from the last
delivery. It checks at every read while few are kept (VERIFY_ALWAYS_UP_TO: one multi-get), else
at most every VERIFY_EVERY_S (each check reads every one kept). What is kept is used only right
after a read: on admission's refusing path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from nats.aio.client import Client

from spear.core.names import Names
from spear.jetstream import directget

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0
VERIFY_ALWAYS_UP_TO = 64  # kept entries checked at every read; more are checked at most every:
VERIFY_EVERY_S = 1.0


@dataclass
class _Kept:
    scanned: int = 0  # the task's `cancelled` events are read up to this stream sequence
    marker: str = ""  # the subject of the one at `scanned`
    # `requested` events of cancelled executions not delivered yet: sequence -> subject
    waiting: dict[int, str] = field(default_factory=dict)
    verified_at: float = -math.inf


class CancelledWhileWaiting:
    """Per task, the undelivered invocations whose execution was cancelled, as last read."""

    def __init__(self, nc: Client, names: Names, limit: int):
        self.nc = nc
        self.names = names
        self.limit = limit  # `cancelled` events read at once, at most
        self._kept: dict[str, _Kept] = {}

    def sequences(self, task_id: str, delivered: int) -> Collection[int]:
        """The stream sequences of the task's invocations after `delivered` known to be cancelled."""
        kept = self._kept.get(task_id)
        if kept is None:
            return ()
        if kept.waiting and min(kept.waiting) <= delivered:
            kept.waiting = {seq: subject for seq, subject in kept.waiting.items() if seq > delivered}
        return kept.waiting.keys()

    async def read(self, task_id: str, delivered: int) -> None:
        """Read the task's `cancelled` events stored since the last read. A read that fails leaves
        what was kept (these reads only make room: a full queue still refuses, review27)."""
        kept = self._kept.setdefault(task_id, _Kept())
        try:
            now = time.monotonic()
            if len(kept.waiting) <= VERIFY_ALWAYS_UP_TO or now - kept.verified_at >= VERIFY_EVERY_S:
                await self._verify(kept)
                kept.verified_at = now
            await self._read(task_id, delivered, kept)
        except Exception as exc:  # JetStream away or slow: the next refusal reads on
            log.debug("admission: cancellations of %s not read: %s", task_id, exc)

    async def _verify(self, kept: _Kept) -> None:
        """Drop what is kept of events no longer stored where they were."""
        stream = self.names.stream
        if kept.waiting:
            stored = await directget.newest_of(self.nc, stream, sorted(set(kept.waiting.values())), READ_TIMEOUT_S)
            still = {message.seq for message in stored}
            kept.waiting = {seq: subject for seq, subject in kept.waiting.items() if seq in still}
        if kept.scanned:
            marker = await directget.read_batch(self.nc, stream, kept.marker, kept.scanned, READ_TIMEOUT_S, count=1)
            if not marker.found or marker.found[0].seq != kept.scanned:
                kept.scanned, kept.marker = 0, ""  # (read again from the last delivery)

    async def _read(self, task_id: str, delivered: int, kept: _Kept) -> None:
        # (a `cancelled` stored before the last delivery is of an invocation delivered before it)
        after, marker = max(kept.scanned, delivered), kept.marker
        executions: list[str] = []
        async for found in directget.read_all(
            self.nc, self.names.stream, self.names.event(task_id, "*", "cancelled"), after, READ_TIMEOUT_S
        ):
            executions.append(found.subject.rsplit(".", 2)[-2])
            after, marker = found.seq, found.subject
            if len(executions) >= self.limit:
                break
        if not executions:
            return
        requested = [self.names.event(task_id, execution_id, "requested") for execution_id in executions]
        stored = await directget.newest_of(self.nc, self.names.stream, requested, READ_TIMEOUT_S)
        kept.waiting.update({message.seq: message.subject for message in stored if message.seq > delivered})
        kept.scanned, kept.marker = after, marker  # (only once both reads succeeded: none is skipped)

    def forget(self, task_id: str) -> None:
        """Drop what is kept of the task (its consumer or the stream was made anew)."""
        self._kept.pop(task_id, None)
