"""The gateway's view of the task registry bucket: which tasks and functions exist.

Workers publish their TaskInfo there at start-up; a KV watch keeps this view current, so a
name check costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.js.kv import KeyValue

from spear.core import contract
from spear.core.contract import TaskInfo

log = logging.getLogger(__name__)


class TaskDirectory:
    def __init__(self) -> None:
        self.tasks: dict[str, TaskInfo] = {}
        self._watcher = None
        self._follow: asyncio.Task | None = None

    async def start(self, kv: KeyValue) -> None:
        self._watcher = await kv.watchall()
        async for entry in self._watcher:
            if entry is None:  # initial values are in
                break
            self._apply(entry)
        self._follow = asyncio.get_running_loop().create_task(self._follow_updates())

    async def stop(self) -> None:
        if self._follow:
            self._follow.cancel()
        if self._watcher:
            try:
                await self._watcher.stop()
            except Exception:
                pass

    def get(self, task_id: str) -> TaskInfo | None:
        return self.tasks.get(task_id)

    async def _follow_updates(self) -> None:
        async for entry in self._watcher:
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.tasks.pop(entry.key, None)
            return
        try:
            task = msgspec.json.decode(entry.value, type=TaskInfo)
        except msgspec.DecodeError:
            log.error("task registry: undecodable entry %s ignored", entry.key)
            return
        if hasattr(entry.created, "timestamp"):  # when a worker last registered it
            registered = contract.format_timestamp(entry.created.timestamp())
            task = msgspec.structs.replace(task, created_at=task.created_at or registered, updated_at=registered)
        self.tasks[entry.key] = task
