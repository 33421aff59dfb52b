"""The gateway's view of the task registry bucket: which tasks and functions exist, and the
parameters each function takes.

Workers publish their TaskInfo there at start-up; a KV watch keeps this view current, so checking
a call (task, function, parameter names) costs a few dictionary lookups and no task code.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging

import msgspec
from nats.js.kv import KeyValue

from spear.core import contract
from spear.core.contract import FunctionInfo, TaskInfo
from spear.core.enums import ApiError, ErrorCode

log = logging.getLogger(__name__)


class TaskDirectory:
    """The registered tasks, kept current from the task registry bucket (a KV watch)."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskInfo] = {}
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self, kv: KeyValue) -> None:
        """Read every registered task, then follow changes."""
        watcher = self._watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None:  # initial values are in
                break
            self._apply(entry)
        self._follow = asyncio.get_running_loop().create_task(self._follow_updates(watcher))

    async def stop(self) -> None:
        """Stop following the registry."""
        if self._follow:
            self._follow.cancel()
        if self._watcher:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]  # unannotated in nats-py

    def get(self, task_id: str) -> TaskInfo | None:
        """The task registered under `task_id`, if any."""
        return self.tasks.get(task_id)

    def function(self, task_id: str, function_name: str) -> FunctionInfo:
        """The function a call names, or NOT_FOUND."""
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"task {task_id!r} is not registered")
        for function in task.functions:
            if function.name == function_name:
                return function
        raise ApiError(ErrorCode.NOT_FOUND, f"task {task_id!r} has no function {function_name!r}")

    async def _follow_updates(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.tasks.pop(entry.key, None)
            return
        try:
            task = msgspec.json.decode(entry.value, type=TaskInfo)
        except msgspec.DecodeError:
            log.error("task registry: undecodable entry %s ignored", entry.key)
            return
        created: object = entry.created  # nats-py annotates an int; it holds the message's datetime
        if isinstance(created, datetime.datetime):  # when a worker last registered it
            registered = contract.format_timestamp(created.timestamp())
            task = msgspec.structs.replace(task, created_at=task.created_at or registered, updated_at=registered)
        self.tasks[entry.key] = task


def check_parameters(function: FunctionInfo, names: list[str]) -> None:
    """INVALID_ARGUMENT for a call that misses a required parameter or names one the function does
    not take (a function taking **kwargs takes any)."""
    known = {p.name for p in function.parameters}
    missing = [p.name for p in function.parameters if p.required and p.name not in names]
    unknown = [] if function.accepts_any else [name for name in names if name not in known]
    problems = []
    if missing:
        problems.append(f"missing required parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if problems:
        takes = ", ".join(p.name if p.required else f"{p.name}=…" for p in function.parameters)
        if function.accepts_any:
            takes += (", " if takes else "") + "**kwargs"
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{function.name}({takes}): {'; '.join(problems)}")
