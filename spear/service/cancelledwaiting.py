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
is made anew (sequences start again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nats.aio.client import Client

from spear.core.names import Names
from spear.jetstream import directget

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0


@dataclass
class _Kept:
    scanned: int = 0  # the task's `cancelled` events are read up to this stream sequence
    waiting: set[int] = field(default_factory=set)  # sequences of `requested` cancelled, not delivered


class CancelledWhileWaiting:
    """Per task, the undelivered invocations whose execution was cancelled, as last read."""

    def __init__(self, nc: Client, names: Names, limit: int):
        self.nc = nc
        self.names = names
        self.limit = limit  # `cancelled` events read at once, at most
        self._kept: dict[str, _Kept] = {}

    def sequences(self, task_id: str, delivered: int) -> set[int]:
        """The stream sequences of the task's invocations after `delivered` known to be cancelled."""
        kept = self._kept.get(task_id)
        if kept is None:
            return set()
        if kept.waiting and min(kept.waiting) <= delivered:
            kept.waiting = {seq for seq in kept.waiting if seq > delivered}
        return kept.waiting

    async def read(self, task_id: str, delivered: int) -> None:
        """Read the task's `cancelled` events stored since the last read. A read that fails leaves
        what was kept (these reads only make room: a full queue still refuses, review27)."""
        kept = self._kept.setdefault(task_id, _Kept())
        try:
            await self._read(task_id, delivered, kept)
        except Exception as exc:  # JetStream away or slow: the next refusal reads on
            log.debug("admission: cancellations of %s not read: %s", task_id, exc)

    async def _read(self, task_id: str, delivered: int, kept: _Kept) -> None:
        # (a `cancelled` stored before the last delivery is of an invocation delivered before it)
        after = max(kept.scanned, delivered)
        executions: list[str] = []
        async for found in directget.read_all(
            self.nc, self.names.stream, self.names.event(task_id, "*", "cancelled"), after, READ_TIMEOUT_S
        ):
            executions.append(found.subject.rsplit(".", 2)[-2])
            after = found.seq
            if len(executions) >= self.limit:
                break
        if not executions:
            return
        requested = [self.names.event(task_id, execution_id, "requested") for execution_id in executions]
        stored = await directget.newest_of(self.nc, self.names.stream, requested, READ_TIMEOUT_S)
        kept.waiting |= {message.seq for message in stored if message.seq > delivered}
        kept.scanned = after  # (only once both reads succeeded: none is skipped)

    def forget(self, task_id: str) -> None:
        """Drop what is kept of the task (its consumer or the stream was made anew)."""
        self._kept.pop(task_id, None)
