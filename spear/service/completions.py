"""Waiting for an execution's terminal event, for SYNC callers (and cancel replies).

A service process follows the terminal events through a JetStream consumer of its own while
someone there may wait for one: an ordered push consumer on the executions stream, filtered on
the terminal kinds, delivering from "now" on. It is made when a wait first needs it (`following`,
awaited before the append that a wait is for) and goes once nobody has needed it for IDLE_S: a
gateway that only accepts ASYNC calls, or runs its SYNC calls itself (inline), receives no terminal
event of anyone's, on the cores that serve its callers.

What a consumer delivers is what the stream stored, so a delivery resolves a wait at once: no
confirming read (the core republish on `P.exec.>` can be imitated by anyone who may
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
import contextlib
import logging
import time

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from spear.aio import detached
from spear.core.events import BadEvent, StoredResult, decode_event, is_terminal
from spear.core.names import Names

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # the server's idle heartbeat: two missed ones (2 s) make the consumer anew
IDLE_S = 60.0  # unneeded this long, the consumer goes (made again, ~1 ms, by the next wait)
# Without a subscriber this long, the server deletes the consumer (a reconnect that takes longer
# is followed by a new one, as after any loss of the consumer).
INACTIVE_S = 2.0
MAKE_TIMEOUT_S = 2.0  # per request of making it (it takes ~1 ms)
FIRST_TRY_S = 0.5  # a wait's append waits this long at most for it; then the wait reads the log
MAKE_RETRY_S = 0.25  # a consumer that could not be made is tried again this often while needed


class WaitsEnded(Exception):
    """The gateway is stopping: a SYNC wait still going is answered without its result."""


class Completions:
    """Futures for the results of executions someone waits for, fed by stored terminal events."""

    def __init__(self, nc: Client, names: Names, heartbeat_s: float = HEARTBEAT_S, idle_s: float = IDLE_S):
        self.nc = nc
        self.names = names
        self.heartbeat_s = heartbeat_s
        self.idle_s = idle_s
        self.waiters: dict[str, list[asyncio.Future[StoredResult]]] = {}
        self.sub: JetStreamContext.PushSubscription | None = None
        self._attempt: asyncio.Task[None] | None = None  # making it, shared by the callers of a moment
        self._stopped = False
        self._needed_at = 0.0  # monotonic time of the last `following`
        self._retiring: asyncio.Task[None] | None = None
        self._retrying: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """Whether terminal events stored from now on reach the waiters."""
        return self.sub is not None

    async def following(self) -> bool:
        """Whether the consumer is live, made now if it is not: terminal events stored from then
        on resolve waits. Await it after `expect` and before the append the wait is for. False:
        it is not live within FIRST_TRY_S (a cluster electing its leaders, say); it is then tried
        again in the background, and waiters read the log instead until it is `live`. All the
        callers of a moment share one attempt; none waits for one while a retry goes on."""
        self._needed_at = time.monotonic()
        if self.sub is not None or self._stopped:
            return self.sub is not None
        if self._retrying is not None and not self._retrying.done():
            return False  # known to be failing: read the log rather than queue up
        if self._attempt is None or self._attempt.done():
            self._attempt = detached(self._first_try())
        try:
            await asyncio.wait_for(asyncio.shield(self._attempt), FIRST_TRY_S)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this wait is cancelled, not (by `stop`) the attempt
        return self.sub is not None

    async def _first_try(self) -> None:
        try:
            await self._make()
        except nats.errors.Error as exc:
            log.info("completions: consumer not made (%s: %s); trying again", type(exc).__name__, exc)
            if not self._stopped:
                self._retrying = detached(self._make_until_made())

    async def _make_until_made(self) -> None:
        """Try again while a wait may need it."""
        while self.sub is None and not self._stopped and (self.waiters or not self._idle()):
            await asyncio.sleep(MAKE_RETRY_S)
            try:
                await self._make()
            except nats.errors.Error as exc:
                log.debug("completions: consumer not made (%s: %s); trying again", type(exc).__name__, exc)

    def _idle(self) -> bool:
        return time.monotonic() - self._needed_at >= self.idle_s

    async def _make(self) -> None:
        js = self.nc.jetstream(timeout=MAKE_TIMEOUT_S)
        last_seq = (await js.stream_info(self.names.stream)).state.last_seq
        subjects = self.names.terminal_events()
        sub = await js.subscribe(
            subjects[0],
            stream=self.names.stream,
            cb=self._on_terminal,
            ordered_consumer=True,
            idle_heartbeat=self.heartbeat_s,
            inactive_threshold=INACTIVE_S,
            deliver_policy=api.DeliverPolicy.NEW,
            config=api.ConsumerConfig(filter_subjects=subjects),
            # Never slow-consumer-drop a delivery: the consumer would then start over (a gap).
            pending_msgs_limit=0,
            pending_bytes_limit=0,
        )
        # Should it be made anew before delivering anything, it resumes after what was stored
        # now, not from the stream's first event (nats-py would start at sequence 1).
        jsi = getattr(sub._sub, "_jsi", None)
        if jsi is not None and not jsi._sseq:
            jsi._sseq = last_seq
        if self._stopped:  # stopped while it was being made
            await sub.unsubscribe()
            return
        self.sub = sub
        if self._retiring is None or self._retiring.done():
            self._retiring = detached(self._retire_when_idle())

    async def _retire_when_idle(self) -> None:
        """Stop following once no wait is open and none has needed the consumer for idle_s."""
        while self.sub is not None:
            await asyncio.sleep(max(0.01, self.idle_s / 4))
            if self.sub is not None and not self.waiters and self._idle():
                await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        sub, self.sub = self.sub, None  # at once: a wait needing it from now on makes a new one
        if sub is None:
            return
        try:
            await sub.unsubscribe()  # the server sends nothing more, and drops it after INACTIVE_S
        except Exception as exc:  # a closed connection: nothing left to stop
            log.debug("completions: unsubscribe: %s", exc)

    async def stop(self) -> None:
        """Stop following (the ephemeral consumer goes with its subscription); waiters left are
        the callers' to time out."""
        self._stopped = True
        for task in (self._attempt, self._retiring, self._retrying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._unsubscribe()

    @property
    def consumer(self) -> str:
        """The name of the consumer now in use (it changes when it is made anew; "" while none is)."""
        return self.sub._consumer if self.sub is not None else ""

    async def end_waits(self, after_s: float) -> None:
        """At a stop: give the waits `after_s` to be answered, then end those left with
        `WaitsEnded` (their callers get a definite reply before the adapters close)."""
        waiting = [future for futures in self.waiters.values() for future in futures if not future.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=after_s)
        for futures in self.waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(WaitsEnded())

    def expect(self, execution_id: str) -> asyncio.Future[StoredResult]:
        """Register interest before appending (then await `following`), so the terminal event
        cannot slip by."""
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
