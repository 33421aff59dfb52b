"""A running attempt's own appends (`log` events: log lines and progress), kept in order and
fenced like every other append.

A function reports from its thread or coroutine; the reports are appended one at a time, each
naming the sequence of the attempt's previous event, so the attempt's terminal event can name
the last one. Progress reports that pile up while an append is in flight are coalesced: only
the newest is stored. A conflict (a cancel request, a newer attempt) ends the reporting; the
terminal append then meets the same conflict and resolves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from spear.core import contract
from spear.core.events import Logged, Requested
from spear.jetstream.store import AppendConflict, Appended

log = logging.getLogger(__name__)

Append = Callable[..., Awaitable[Appended]]


class AttemptLog:
    def __init__(self, append: Append, request: Requested, attempt: int, last_seq: int):
        self.append = append
        self.request = request
        self.attempt = attempt
        self.last_seq = last_seq  # of this attempt's newest stored event
        self.loop = asyncio.get_running_loop()
        self._lines: list[Logged] = []
        self._progress: Logged | None = None
        self._writer: asyncio.Task | None = None
        self._closed = False

    def report(self, progress: float | None, message: str) -> None:
        """From any thread: queue a log line (progress None) or a progress report."""
        self.loop.call_soon_threadsafe(self._queue, progress, message)

    def _queue(self, progress: float | None, message: str) -> None:
        if self._closed:
            return
        event = Logged(
            execution_id=self.request.execution_id,
            task_id=self.request.task_id,
            function_name=self.request.function_name,
            at=contract.format_timestamp(time.time()),
            attempt=self.attempt,
            message=message,
            progress=progress,
        )
        if progress is None:
            self._lines.append(event)
        else:
            self._progress = event  # a newer report replaces one not yet stored
        if self._writer is None or self._writer.done():
            self._writer = self.loop.create_task(self._write())

    async def _write(self) -> None:
        while not self._closed and (self._lines or self._progress):
            if self._lines:
                event = self._lines.pop(0)
            else:
                event, self._progress = self._progress, None
            try:
                self.last_seq = (await self.append(event, expect_last_seq=self.last_seq)).seq
            except AppendConflict:
                self._closed = True
            except Exception as exc:  # a report is not worth failing the execution for
                log.warning("progress of %s not recorded: %s", self.request.execution_id, exc)

    async def close(self) -> int:
        """Store what is queued, stop taking reports, and return the newest sequence."""
        await asyncio.sleep(0)  # reports scheduled from the function's thread arrive first
        if self._writer is not None:
            await self._writer
        self._closed = True
        return self.last_seq
