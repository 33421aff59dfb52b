"""The gateway's view of the tasks: which tasks and functions exist, and the parameters each
function takes.

Two sources: tasks served from code (workers publish their TaskInfo to the task registry bucket at
start-up; a KV watch keeps them current) and tasks registered at runtime (the registry stream's
events, replayed and followed: `spear.jetstream.registrystore`). Checking a call (task, function,
parameter names) costs a few dictionary lookups and no task code.
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
from spear.core.contract.encoding import names_listed
from spear.core.enums import ApiError, ErrorCode
from spear.jetstream.registrystore import RegistryFollower, RegistryStore

log = logging.getLogger(__name__)

INITIAL_VALUES_S = 5.0  # the longest a start waits for the bucket's values it counted


class TaskDirectory:
    """Every task: those served from code (a KV watch on the task registry bucket) and those
    registered at runtime (the registry stream, followed)."""

    def __init__(self, store: RegistryStore | None = None) -> None:
        self.code: dict[str, TaskInfo] = {}  # served from code, as workers published them
        self.registered = RegistryFollower(store) if store else None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follow: asyncio.Task[None] | None = None

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        """Every task: those served from code and those registered at runtime."""
        if self.registered is None:
            return self.code
        return {**self.code, **self.registered.registry.tasks}

    async def start(self, kv: KeyValue, key_count: int) -> None:
        """Read every task, then follow changes. `key_count`: the bucket's keys, deleted ones
        included, counted before (`topology.subject_count`)."""
        if self.registered is not None:
            await self.registered.start()
        # nats-py's "initial values are in" marker is not enough: it trusts a consumer info that
        # may say nothing is pending while the values are still on their way (CI, under load: a
        # gateway just started answered NOT_FOUND for `demo`). So wait for as many keys as the
        # bucket held too.
        watcher = self._watcher = await kv.watchall()
        keys: set[str] = set()
        marker_seen = False
        deadline = asyncio.get_running_loop().time() + INITIAL_VALUES_S
        while not marker_seen or len(keys) < key_count:
            left = deadline - asyncio.get_running_loop().time()
            try:
                entry = await watcher.updates(timeout=max(left, 0.001))  # type: ignore[no-untyped-call]  # unannotated in nats-py
            except TimeoutError:  # keys deleted since the count: go on with what came
                log.warning("task registry: %d of %d initial values came; going on", len(keys), key_count)
                break
            if entry is None:
                marker_seen = True
            else:
                keys.add(entry.key)
                self._apply(entry)
        self._follow = asyncio.get_running_loop().create_task(self._follow_updates(watcher))

    async def stop(self) -> None:
        """Stop following the registry."""
        if self.registered is not None:
            await self.registered.stop()
        if self._follow:
            self._follow.cancel()
        if self._watcher:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]  # unannotated in nats-py

    def get(self, task_id: str) -> TaskInfo | None:
        """The task registered under `task_id`, if any."""
        if self.registered is not None and task_id in self.registered.registry.tasks:
            return self.registered.registry.tasks[task_id]
        return self.code.get(task_id)

    def function(self, task_id: str, function_name: str) -> FunctionInfo:
        """The function a call names, or NOT_FOUND."""
        task = self.get(task_id)
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
            self.code.pop(entry.key, None)
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
        self.code[entry.key] = task


def check_parameters(function: FunctionInfo, names: list[str]) -> None:
    """INVALID_ARGUMENT for a call that misses a required parameter or names one the function does
    not take (a function taking **kwargs takes any)."""
    known = {p.name for p in function.parameters}
    missing = [p.name for p in function.parameters if p.required and p.name not in names]
    unknown = [] if function.accepts_any else [name for name in names if name not in known]
    problems = []
    if function.context_parameter in names:  # (probe19: a `**kwargs` function's call was stored, then failed)
        problems.append(f"parameter name {function.context_parameter!r} is reserved for the context")
    if missing:
        problems.append(f"missing required parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown parameter{'s' if len(unknown) > 1 else ''} {names_listed(unknown)}")
    if problems:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{function.call_form()}: {'; '.join(problems)}")
