"""Waiting for an execution's terminal event, for SYNC callers (and cancel replies).

One subscription per terminal kind on the re-published events. A live message is only a hint:
anyone who may publish there can send one, headers and all. So a hint for an execution someone
waits for is confirmed with one direct get of the execution's last stored event, and only a
stored terminal event resolves the wait; garbage and forgeries are ignored, never fatal.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from spear.core.events import StoredResult, is_terminal
from spear.core.eventstore import EventStore
from spear.core.names import Names
from spear.jetstream.hints import is_stored_hint

log = logging.getLogger(__name__)


class Completions:
    """Futures for the results of executions someone waits for, fed by terminal events."""

    def __init__(self, nc: Client, names: Names, store: EventStore):
        self.nc = nc
        self.names = names
        self.store = store
        self._checks: set[asyncio.Task[None]] = set()
        self.waiters: dict[str, list[asyncio.Future[StoredResult]]] = {}
        self.subs: list[Subscription] = []

    async def start(self) -> None:
        """Subscribe to every terminal kind."""
        for subject in self.names.terminal_events():
            self.subs.append(await self.nc.subscribe(subject, cb=self._on_terminal))

    async def stop(self) -> None:
        """Unsubscribe; waiters left are the callers' to time out."""
        for sub in self.subs:
            await sub.unsubscribe()
        for check in list(self._checks):
            check.cancel()

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
        if execution_id not in self.waiters or not is_stored_hint(msg, self.names.stream):
            return
        # Confirmed in a task of its own: this callback serves every execution's completions.
        check = asyncio.get_running_loop().create_task(self._confirm(execution_id))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _confirm(self, execution_id: str) -> None:
        try:
            last = await self.store.last(execution_id)
        except Exception as exc:  # the waiter's own deadline check reads the log again
            log.warning("completions: terminal hint for %s not confirmed: %s", execution_id, exc)
            return
        if last is None or not is_terminal(last.event):
            return  # not what the stream stored: a forgery
        for future in self.waiters.pop(execution_id, []):
            if not future.done():
                future.set_result(last.event.result)
