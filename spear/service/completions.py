"""Waiting for an execution's terminal event, for SYNC callers (and cancel replies).

Each service process follows the terminal events through a JetStream consumer of its own: an
ordered push consumer on the executions stream, filtered on the terminal kinds, delivering from
"now" on. What a consumer delivers is what the stream stored, so a delivery resolves a wait at
once: no confirming read (the core republish on `P.exec.>` can be imitated by anyone who may
publish there; deliveries come on this process's own inbox, which only the server writes to
under spear's permissions). Garbage and events whose body disagrees with their subject are
ignored, never fatal.

nats-py's ordered consumer recreates itself after a gap or after missing two idle heartbeats
(a consumer lost with its server, or deleted), resuming after the last stream sequence it
delivered, so nothing stored meanwhile is missed; a waiter whose own deadline comes first reads
the execution's last event (operations.py), as it always did.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from spear.core.events import BadEvent, StoredResult, decode_event, is_terminal
from spear.core.names import Names

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # the server's idle heartbeat: two missed ones (2 s) make the consumer anew


class Completions:
    """Futures for the results of executions someone waits for, fed by stored terminal events."""

    def __init__(self, nc: Client, names: Names, heartbeat_s: float = HEARTBEAT_S):
        self.nc = nc
        self.names = names
        self.heartbeat_s = heartbeat_s
        self.waiters: dict[str, list[asyncio.Future[StoredResult]]] = {}
        self.sub: JetStreamContext.PushSubscription | None = None

    async def start(self) -> None:
        """Create the consumer; terminal events stored from now on resolve waits."""
        js = self.nc.jetstream()
        last_seq = (await js.stream_info(self.names.stream)).state.last_seq
        subjects = self.names.terminal_events()
        self.sub = await js.subscribe(
            subjects[0],
            stream=self.names.stream,
            cb=self._on_terminal,
            ordered_consumer=True,
            idle_heartbeat=self.heartbeat_s,
            deliver_policy=api.DeliverPolicy.NEW,
            config=api.ConsumerConfig(filter_subjects=subjects),
            # Never slow-consumer-drop a delivery: the consumer would then start over (a gap).
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
        # Should it be made anew before delivering anything, it resumes after what was stored
        # now, not from the stream's first event (nats-py would start at sequence 1).
        jsi = getattr(self.sub._sub, "_jsi", None)
        if jsi is not None and not jsi._sseq:
            jsi._sseq = last_seq

    async def stop(self) -> None:
        """Stop following (the ephemeral consumer goes with its subscription); waiters left are
        the callers' to time out."""
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing left to stop
                log.debug("completions: unsubscribe: %s", exc)
            self.sub = None

    @property
    def consumer(self) -> str:
        """The name of the consumer now in use (it changes when it is made anew)."""
        return self.sub._consumer if self.sub is not None else ""

    def expect(self, execution_id: str) -> asyncio.Future[StoredResult]:
        """Register interest before appending, so the terminal event cannot slip by."""
        future: asyncio.Future[StoredResult] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(execution_id, []).append(future)
        return future

    def forget(self, execution_id: str, future: asyncio.Future[StoredResult]) -> None:
        """Drop a waiter (once its caller stops waiting, answered or not)."""
        futures = self.waiters.get(execution_id)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self.waiters[execution_id]

    async def _on_terminal(self, msg: Msg) -> None:
        execution_id = self.names.event_execution_id(msg.subject)
        if execution_id not in self.waiters:
            return  # every terminal event reaches every service process: most are someone else's
        try:
            event = decode_event(msg.data, msg.subject)
        except BadEvent as exc:
            log.warning("completions: stored event on %s left out: %s", msg.subject[:300], exc)
            return
        if not is_terminal(event):
            return
        for future in self.waiters.pop(execution_id, []):
            if not future.done():
                future.set_result(event.result)
