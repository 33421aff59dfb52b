"""Admission control: refuse work beyond the configured limits at once, before anything is written.

SYNC calls in flight are counted per gateway process (`sync_execution.max_concurrent_requests`).
The ASYNC queue of a task is its worker consumer's backlog (`num_pending`: invocations no worker
has taken yet), read at most every QUEUE_REFRESH_S and counted up locally in between
(`async_execution.max_queue_size`).
"""

from __future__ import annotations

import time

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from spear.core.config import Settings
from spear.core.enums import ApiError, ErrorCode
from spear.core.names import Names

QUEUE_REFRESH_S = 0.1


class Admission:
    """The gateway's admission limits: SYNC calls in flight, and each task's ASYNC backlog."""

    def __init__(self, nc: Client, names: Names, settings: Settings):
        self.js = nc.jetstream()
        self.names = names
        self.max_sync = settings.sync_execution.max_concurrent_requests
        self.max_queue = settings.async_execution.max_queue_size
        self.sync_in_flight = 0
        self._queues: dict[str, tuple[float, int]] = {}  # task -> (read at, backlog)

    def enter_sync(self) -> None:
        """Count a SYNC call in, or refuse it (RESOURCE_EXHAUSTED) at the limit."""
        if self.sync_in_flight >= self.max_sync:
            raise ApiError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{self.sync_in_flight} SYNC calls in flight: the limit is {self.max_sync}",
            )
        self.sync_in_flight += 1

    def leave_sync(self) -> None:
        """Count a SYNC call out."""
        self.sync_in_flight -= 1

    async def check_queue(self, task_id: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an ASYNC invocation of a task whose backlog is full."""
        backlog = await self._backlog(task_id)
        if backlog >= self.max_queue:
            raise ApiError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{backlog} invocations of task {task_id!r} wait for a worker: the limit is {self.max_queue}",
            )

    def accepted(self, task_id: str) -> None:
        """Count an accepted ASYNC invocation into the task's backlog until the next read."""
        read_at, backlog = self._queues.get(task_id, (0.0, 0))
        self._queues[task_id] = (read_at, backlog + 1)

    async def _backlog(self, task_id: str) -> int:
        read_at, backlog = self._queues.get(task_id, (0.0, 0))
        now = time.monotonic()
        if now - read_at < QUEUE_REFRESH_S:
            return backlog
        try:
            info = await self.js.consumer_info(self.names.stream, self.names.worker_consumer(task_id), timeout=2)
            backlog = info.num_pending
        except NotFoundError:
            backlog = 0  # no worker ever served the task: nothing to measure yet
        self._queues[task_id] = (now, backlog)
        return backlog
