"""Waiting for an execution's terminal event, for SYNC callers.

One subscription per terminal kind on the re-published (so: stored) events; the execution id
is read from the subject and only events someone waits for are decoded.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg

from spear.core.contract import ExecutionResult
from spear.core.events import decode_event
from spear.core.names import Names


class Completions:
    def __init__(self, nc: Client, names: Names):
        self.nc = nc
        self.names = names
        self.waiters: dict[str, list[asyncio.Future[ExecutionResult]]] = {}
        self.subs = []

    async def start(self) -> None:
        for subject in self.names.terminal_events():
            self.subs.append(await self.nc.subscribe(subject, cb=self._on_terminal))

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()

    def expect(self, execution_id: str) -> asyncio.Future[ExecutionResult]:
        """Register interest before appending, so the terminal event cannot slip by."""
        future = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(execution_id, []).append(future)
        return future

    def forget(self, execution_id: str, future: asyncio.Future) -> None:
        futures = self.waiters.get(execution_id)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self.waiters[execution_id]

    async def _on_terminal(self, msg: Msg) -> None:
        futures = self.waiters.pop(self.names.event_execution_id(msg.subject), None)
        if not futures:
            return
        result = decode_event(msg.data).result
        for future in futures:
            if not future.done():
                future.set_result(result)
