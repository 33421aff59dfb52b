"""SYNC calls of inline functions, run by the gateway itself: one chain of appends, no worker hop.

A SYNC call with a server-made execution id of a function declared `inline=True` (quick, plain,
called on the loop) of a task this process loaded from code (`spear up`) is run here, by the
worker's own code (`run_attempt`: parameters bound, Context, result checks, error classes). Its
`requested`, `started`, log lines and end (terminal, or `retrying` with retries left) are then
stored as one chain (`append_chain`): sent back to back, each fenced on the one before being
the stream's newest message (message ids of the call's own), one acknowledgement. Nothing is
stored before the function ran, so nothing (worker, cancel, subscriber) can act on the execution
meanwhile; the caller is answered from what was stored. An id the client said was new may name
an execution all the same: the chain is refused, and the call is judged as any under a chosen id
(ALREADY_EXISTS, or the stored execution joined).

A chain is refused from the first message where another append (of any execution) got in between:
what is stored then is a prefix of it, and the rest is stored one by one, each fenced on the
execution's last sequence, which other executions do not move. The events carry
RAN_INLINE_HEADER: the worker that `requested` is delivered to reads the execution's last event
first, acknowledges an ended execution, waits out a `retrying` one's backoff, and holds back from
one whose end is still being stored here, so the function does not run twice (docs/design.md).
Atomic batches were measured and not chosen: on a one-replica stream the server stages each
batch on disk, ~4 ms per call (docs/performance.md).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import cast

from spear.core.config import Settings
from spear.core.enums import ExecutionMode
from spear.core.events import Event, Requested, Started, envelope
from spear.core.eventstore import AppendConflict, EventStore, Stored
from spear.core.names import RAN_INLINE_HEADER
from spear.service.writes import joined
from spear.telemetry import tracing
from spear.worker.appends import AttemptAppends
from spear.worker.attempt import Running, end_event, max_result_bytes, run_attempt
from spear.worker.context import Context
from spear.worker.tasks import Function, Task

FULL_SKIP_S = 10.0  # after JetStream refused an append for lack of room, calls take the usual path


class InlineCalls:
    """Runs the eligible SYNC calls of this process's code tasks and stores their attempts."""

    def __init__(self, store: EventStore, settings: Settings, tasks: list[Task], max_payload: int):
        self.store = store
        self.settings = settings
        self.functions = {
            (task.task_id, name): function
            for task in tasks
            for name, function in task.functions.items()
            if function.inline and function.native is None
        }
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-gateway"  # what status shows ran it
        self.headers = {RAN_INLINE_HEADER: self.worker_id}
        self.max_result_bytes = max_result_bytes(max_payload)
        self.repair_s = settings.nats.request_timeout_ms / 1000
        self.repaired = 0  # refused chains (their rest stored one by one, or the execution judged)
        self.token = os.urandom(4).hex() + "-"  # with a count: the message ids of one call (`run`)
        self.calls = itertools.count()

    def function(self, request: Requested, client_chose_id: bool) -> Function | None:
        """The function to run here for `request`, or None: it takes the usual path. A client-chosen
        id may name an execution that exists (its `requested` would be a duplicate)."""
        if client_chose_id or request.execution_mode != ExecutionMode.SYNC:
            return None
        if self.store.full_at is not None and time.monotonic() - self.store.full_at < FULL_SKIP_S:
            return None  # JetStream had no room lately: stored first, or refused, never run unrecorded
        return self.functions.get((request.task_id, request.function_name))

    async def run(self, request: Requested, function: Function) -> Event | None:
        """Run attempt 1 of `request` and store it with `request`: the stored end (terminal, or
        `retrying`), or None if another party (a cancel, a worker) got to the execution first,
        and its end is to be waited for."""
        execution_id = request.execution_id
        ctx = Context(
            execution_id, request.task_id, request.function_name, 1, deadline=time.time() + request.timeout_ms / 1000
        )
        started = Started(**envelope(request, 1), worker_id=self.worker_id)
        appends = AttemptAppends(self.store.append, self.store.append_batch, request, ctx, None, self.max_result_bytes)
        ctx.on_report = appends.report  # held: the log lines wait here, stored with the attempt
        outcome = await run_attempt(
            function,
            request.parameters,
            Running(ctx, function),
            request.timeout_ms,
            started.at,
            None,
            self.max_result_bytes,
        )
        logged = appends.take_held()
        end, end_id = end_event(request, outcome, self.settings.retry)
        events: list[Event] = [request, started, *logged, end]
        # This call's own message ids (probe57): each event of the chain is fenced on the one
        # before being the stream's newest message, which only this chain's can then be. With the
        # ids the usual path gives (`<id>:requested`, `<id>:terminal:1`), a chain under an id
        # used before had its `requested` dropped as a duplicate and its `started` stored after
        # that execution's `requested`, or its end dropped as a duplicate of that execution's
        # end and acknowledged: another request's run replied, or stored, as that execution's.
        call = f"{self.token}{next(self.calls)}"
        msg_ids = [
            f"{execution_id}:requested:{call}",
            f"{execution_id}:started:1:{call}",
            *(f"{execution_id}:log:1:{index}:{call}" for index in range(len(logged))),
            f"{end_id or f'{execution_id}:retrying:1'}:{call}",
        ]
        # One trace for the attempt however it is stored: with tracing off and no caller's trace,
        # a new root, which the appends of a refused chain's rest carry too.
        headers = self.headers if tracing.may_record() else tracing.rooted(self.headers)
        return await self._store(events, msg_ids, headers or self.headers)

    async def _store(self, events: list[Event], msg_ids: list[str], headers: dict[str, str]) -> Event | None:
        """Store `events` (an execution's first ones) in order: a chain, and what a refused chain
        left out one by one, each fenced on the execution's last sequence. What is replied is
        what is stored: this chain's end, the stored end it reads, or None (wait for the end).
        ApiError ALREADY_EXISTS: the id names an execution of another request (a client that
        said the id was new, `Spear-New-Execution-Id`, had used it before)."""
        try:
            appended = await self.store.append_chain(events, expect_last_seq=0, msg_ids=msg_ids, headers=headers)
            if not appended.duplicate:  # (a duplicate end is another one's: read what is stored)
                return events[-1]
        except AppendConflict:
            pass
        self.repaired += 1
        # Each read or append below is bounded by the request timeout too, so the last one ends
        # within twice that of the refusal: the hold-off of workers (worker.py) is longer.
        deadline = time.monotonic() + self.repair_s
        request = cast(Requested, events[0])
        unreadable = False  # `requested` was refused with nothing readable stored under the id
        while time.monotonic() < deadline:
            stored = await self.store.history(request.execution_id)
            if (stored and not _same_event(stored[0].event, request)) or (unreadable and not stored):
                # The id named an execution already: another request's (or one no reader can
                # trust) is ALREADY_EXISTS, and the same request's is joined, its end waited for
                # (this run is not recorded).
                joined(request, stored)
                return None
            ours = _stored_prefix(stored, events)
            if ours < len(stored):  # another party's event: that party ends the execution
                return None
            if ours == len(events):
                return stored[-1].event
            last_seq = stored[-1].seq if stored else 0
            try:
                for event, msg_id in zip(events[ours:], msg_ids[ours:], strict=True):
                    if time.monotonic() >= deadline:  # past it, a worker may take over (its hold-off)
                        return None
                    appended = await self.store.append(event, expect_last_seq=last_seq, msg_id=msg_id, headers=headers)
                    if appended.duplicate:
                        raise AppendConflict(f"{event.kind} was stored before")  # read again
                    last_seq = appended.seq
                return events[-1]
            except AppendConflict:
                # (once more: another's `requested` may have been stored since the read)
                unreadable = not stored and last_seq == 0
                continue
        return None


def _stored_prefix(stored: list[Stored], events: list[Event]) -> int:
    """How many of `events` lead the execution's stored history: the same kind and attempt (and,
    for `requested`, this very request; for `started`, the same worker) at the same place."""
    count = 0
    for found, event in zip(stored, events, strict=False):
        if not _same_event(found.event, event):
            break
        count += 1
    return count


def _same_event(found: Event, event: Event) -> bool:
    """Whether the stored `found` may be `event` of this call: the same kind and attempt; for a
    `requested`, the same request made at the same moment (not one stored before under the id:
    probe57); for a `started`, the same worker."""
    if found.kind != event.kind or found.attempt != event.attempt:
        return False
    if isinstance(event, Requested):
        return isinstance(found, Requested) and (
            found.at,
            found.task_id,
            found.function_name,
            found.fingerprint,
        ) == (event.at, event.task_id, event.function_name, event.fingerprint)
    if isinstance(event, Started):
        return isinstance(found, Started) and found.worker_id == event.worker_id
    return True
