"""A task registered at runtime, as a worker serves it: its artifact, checked before every use,
and its instances.

An instance is made on first use and reused: for a `python` artifact the module loaded from its
file (a fresh module per instance), for a `process` artifact a sealed copy of the verified
executable's bytes, which is what runs (each call is its own process: sealed.py).
`force_new_instance` retires the current one and makes another; instances idle for
`[tasks] instance_idle_s` are retired. Before each call the file's SHA-256 is compared with
the registered checksum: a changed file fails the call with ARTIFACT_CHECKSUM_MISMATCH and retires
the instance, so code that changed on disk never runs.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from spear import artifacts
from spear.core import contract
from spear.core.contract import ArtifactSpec, InstanceInfo, TaskInfo
from spear.core.enums import ApiError, ErrorCode
from spear.core.jsonlimits import exception_text
from spear.worker.context import Context, ReportedFailure
from spear.worker.process import ServingProcess, run_process
from spear.worker.sealed import SealedProgram
from spear.worker.tasks import Function, Task


@dataclass
class Instance:
    """One loaded instance of a registered task's artifact on this worker."""

    instance_id: str
    path: Path
    task: Task | None  # python artifacts: the loaded spear.Task
    serving: ServingProcess | None  # long-lived process artifacts: its process
    program: SealedProgram | None  # process artifacts: the bytes checked, which are what runs
    created_at: float
    last_used: float
    calls: int = 0

    @property
    def usable(self) -> bool:
        """Whether calls can use it (a long-lived process must be running)."""
        return self.serving is None or self.serving.alive

    def stop(self) -> None:
        """Stop its long-lived process, if it has one."""
        if self.serving is not None:
            self.serving.stop()
        if self.task is not None and self.task.module.startswith(artifacts.MODULE_PREFIX):
            sys.modules.pop(self.task.module, None)  # a retired instance's module can be collected

    def info(self, worker_id: str) -> InstanceInfo:
        """The instance as a worker listing reports it."""
        return InstanceInfo(
            instance_id=self.instance_id,
            worker_id=worker_id,
            created_at=contract.format_timestamp(self.created_at),
            last_used_at=contract.format_timestamp(self.last_used),
            calls=self.calls,
        )


def not_allowed(info: TaskInfo, roots: list[str]) -> str | None:
    """Why a worker with these `roots` ([tasks] artifact_roots, as registration checks them) may
    not run the task's artifact, or None. Whether it is there, whole and loads is found at each
    call (`RegisteredTask.resolve`): a file may come, change or go; where it may be does not."""
    try:
        artifacts.locate(msgspec.convert(info.artifact_spec or {}, ArtifactSpec), roots)
    except ApiError as exc:
        return exc.message if exc.code == ErrorCode.PERMISSION_DENIED else None
    except (msgspec.ValidationError, OSError):
        return None
    return None


class RegisteredTask:
    """A task registered at runtime, as a worker runs it: its artifact and instance."""

    def __init__(self, info: TaskInfo, roots: list[str]):
        self.info = info
        self.task_id = info.task_id
        self.roots = roots
        self.spec = msgspec.convert(info.artifact_spec or {}, ArtifactSpec)
        self.checksum = artifacts.parse_checksum(self.spec.checksum)
        self.long_lived = self.spec.artifact_type == "process" and self.spec.metadata.get("long_lived") == "true"
        self.instance: Instance | None = None
        self._lock = asyncio.Lock()  # one instance is made at a time

    async def resolve(self, function_name: str, force_new: bool) -> tuple[Function | None, str]:
        """The function to run for one call, and the id of the instance it runs in. A changed
        or unusable artifact gives a function that fails the call with the reason."""
        async with self._lock:
            try:
                located = await asyncio.to_thread(self._verified)
            except ReportedFailure as exc:
                self.retire()
                return _failing(function_name, exc), ""
            if self.instance is None or force_new or self.instance.path != located.path or not self.instance.usable:
                self.retire()
                try:
                    self.instance = await self._new_instance(located)
                except artifacts.ArtifactChanged as exc:  # changed between the check and the load
                    self.retire()
                    changed = ReportedFailure(
                        f"artifact changed since it was registered: {exc}",
                        ErrorCode.ARTIFACT_CHECKSUM_MISMATCH,
                        retryable=False,
                    )
                    return _failing(function_name, changed), ""
                except Exception as exc:
                    message = f"artifact {self.spec.location!r} does not load: {exception_text(exc)}"
                    return _failing(function_name, ReportedFailure(message, retryable=False)), ""
            instance = self.instance
        instance.calls += 1
        instance.last_used = time.time()
        return self._function(instance, function_name), instance.instance_id

    def _verified(self) -> artifacts.Located:
        try:
            located = artifacts.locate(self.spec, self.roots)
            actual = artifacts.file_sha256(located.path)
        except (ApiError, OSError) as exc:
            raise ReportedFailure(f"artifact unusable: {getattr(exc, 'message', exc)}", retryable=False) from None
        if actual != self.checksum:
            raise ReportedFailure(
                f"artifact {str(located.path)!r} changed since it was registered: sha256:{actual}, "
                f"registered sha256:{self.checksum}",
                ErrorCode.ARTIFACT_CHECKSUM_MISMATCH,
                retryable=False,
            )
        return located

    async def _new_instance(self, located: artifacts.Located) -> Instance:
        task, serving, program = None, None, None
        if self.spec.artifact_type == "python":
            task = await asyncio.to_thread(artifacts.load_task, located, self.checksum)  # the bytes checked run
        else:
            data = await asyncio.to_thread(artifacts.verified_bytes, located, self.checksum)
            program = SealedProgram.of(data, located.path.name)  # (and those bytes run: sealed.py)
            if self.long_lived:
                serving = ServingProcess(located.path, program)
                await serving.start()
        now = time.time()
        return Instance(uuid.uuid4().hex[:16], located.path, task, serving, program, now, now)

    def _function(self, instance: Instance, function_name: str) -> Function | None:
        if instance.task is not None:
            return instance.task.functions.get(function_name)
        if not self.info.has_function(function_name):
            return None
        if instance.serving is not None:
            call: Any = functools.partial(instance.serving.call, function_name)
        else:
            call = functools.partial(_process_call, instance.path, instance.program, function_name)
        return Function(name=function_name, fn=call, context_parameter=None, streaming=False, native=call)

    def retire_idle(self, idle_s: float, now: float | None = None) -> bool:
        """Drop the instance if unused for `idle_s`; True if one was retired."""
        if self.instance is not None and (now or time.time()) - self.instance.last_used > idle_s:
            self.retire()
            return True
        return False

    def retire(self) -> None:
        """Drop the instance (its long-lived process, if any, is killed)."""
        if self.instance is not None:
            self.instance.stop()
            self.instance = None

    def instances(self, worker_id: str) -> list[InstanceInfo]:
        """Its loaded instances, as a worker listing reports them."""
        return [self.instance.info(worker_id)] if self.instance else []


async def _process_call(
    path: Path,
    program: SealedProgram | None,
    function_name: str,
    parameters: dict[str, Any],
    ctx: Context,
    sink: Any,
    stream: bool,
) -> Any:
    return await run_process(path, function_name, parameters, ctx, sink, stream, program)


def _failing(function_name: str, error: ReportedFailure) -> Function:
    async def fail(parameters: dict[str, Any], ctx: Context, sink: Any, stream: bool) -> Any:
        raise error

    return Function(name=function_name, fn=fail, context_parameter=None, streaming=False, native=fail)
