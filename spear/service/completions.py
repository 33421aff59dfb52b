"""Waiting for an execution's terminal event, for SYNC callers.

One subscription per terminal kind on the re-published (so: stored) events; the execution id
is read from the subject and only events someone waits for are decoded.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from spear.core.events import StoredResult, decode_event, is_terminal
from spear.core.names import Names


class Completions:
    """Futures for the results of executions someone waits for, fed by terminal events."""

    def __init__(self, nc: Client, names: Names):
        self.nc = nc
        self.names = names
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
        futures = self.waiters.pop(self.names.event_execution_id(msg.subject), None)
        if not futures:
            return
        event = decode_event(msg.data)
        if not is_terminal(event):  # cannot happen: the subscriptions are on terminal kinds only
            return
        for future in futures:
            if not future.done():
                future.set_result(event.result)
