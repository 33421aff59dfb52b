"""Tasks registered at runtime (CONTRACT §8): register_task, delete_task, and the registration a
NEW_TASK (or `create_if_not_exists`) invocation makes, written once for both adapters.

Registering runs code, so it is off unless `[tasks] allow_registration`; artifacts must resolve
under `[tasks] artifact_roots`. A registration is a `registered` event in the registry stream and
a deletion a `deleted` one, each appended fenced on the task's last event, so concurrent writers
never both win; this gateway applies its own append at once (the next call already sees it) and
every other gateway and worker follows the stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from spear import artifacts
from spear.aio import DeadlinePassed, poll_until
from spear.core import contract
from spear.core.config import Settings
from spear.core.contract import (
    ArtifactSpec,
    CancelExecutionRequest,
    CancelExecutionResponse,
    DeleteTaskRequest,
    DeleteTaskResponse,
    FunctionInfo,
    RegisterTaskRequest,
    RegisterTaskResponse,
    TaskInfo,
)
from spear.core.enums import ApiError, ErrorCode, ExecutionStatus
from spear.core.eventstore import AppendConflict, EventStore
from spear.core.names import Names
from spear.core.state import ExecutionState, decode_state
from spear.core.taskevents import TaskDeleted, TaskRegistered, same_artifact
from spear.jetstream import directget
from spear.jetstream.registrystore import RegistryStore
from spear.jetstream.store import JetStreamStore
from spear.projection.retention import TASK_CLEANUP, expire, marker_ttl_s
from spear.service.registry import TaskDirectory
from spear.service.views import state_of

MAX_TRIES = 3
SETTLE_S = 5.0  # how long cleanup waits for the projection to record an execution's end


class TaskOperations:
    """register_task / delete_task; `Service` mixes it in. Expects the attributes `Service` sets up."""

    nc: Client
    settings: Settings
    names: Names
    store: EventStore
    stream: JetStreamStore
    tasks: TaskDirectory
    registry_store: RegistryStore
    state_kv: KeyValue | None
    timeout: float

    if TYPE_CHECKING:  # provided by Service and Reads

        async def cancel(self, request: CancelExecutionRequest) -> CancelExecutionResponse: ...  # noqa: D102
        async def execution_state(self, execution_id: str) -> ExecutionState | None: ...  # noqa: D102

    # --- RegisterTask --------------------------------------------------------------------------

    async def register_task(
        self, request: RegisterTaskRequest, serving: str = "", may_create: bool = True
    ) -> RegisterTaskResponse:
        """Register a task (idempotent for the same id and artifact); PERMISSION_DENIED when off or
        outside the roots, INVALID_ARGUMENT on a wrong checksum, ALREADY_EXISTS for another artifact.
        `serving` (a NEW_TASK invocation's function): NOT_FOUND, nothing stored, if the artifact
        has no such function (a probe's refused call had registered its task all the same).
        Without `may_create` only the task registered already with this artifact is found; a new
        registration is PERMISSION_DENIED."""
        tasks = self.settings.tasks
        if not tasks.allow_registration:
            raise ApiError(
                ErrorCode.PERMISSION_DENIED, "registering tasks is off on this server ([tasks] allow_registration)"
            )
        if request.artifact_spec is None:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "artifact_spec is required")
        spec = request.artifact_spec
        located, checksum = await asyncio.to_thread(artifacts.verified, spec, tasks.artifact_roots)
        artifact = msgspec.to_builtins(msgspec.structs.replace(spec, checksum=f"sha256:{checksum}"))
        if not spec.artifact_id:  # left out when not given: workers of a release before it refuse the field
            del artifact["artifact_id"]
        task_id = request.task_id or _derived_id(spec, checksum)
        if task_id in self.tasks.code:
            raise ApiError(ErrorCode.ALREADY_EXISTS, f"task {task_id!r} is served from code; choose another task_id")
        functions: list[FunctionInfo] | None = None
        for _ in range(MAX_TRIES):
            last = await self.registry_store.last(task_id)
            event, seq = last if last is not None else (None, 0)
            if isinstance(event, TaskRegistered):
                if not same_artifact(event.task.artifact_spec, artifact):
                    raise ApiError(
                        ErrorCode.ALREADY_EXISTS,
                        f"task {task_id!r} is registered with another artifact; delete it or choose another task_id",
                    )
                self._apply_registry(event, seq)
                return RegisterTaskResponse(
                    success=True, task_id=task_id, message="Task already registered", task=self.tasks.get(task_id)
                )
            if not may_create:
                raise ApiError(
                    ErrorCode.PERMISSION_DENIED,
                    f"task {task_id!r} is not registered, and InvokeFunction over NATS registers no task here "
                    "([tasks] nats_invoke_registers is off, as with --secure): register it with register_task "
                    "(the admin role), or over HTTP with an admin token",
                )
            if functions is None:
                functions = await self._functions(spec, located)
                if serving and not any(function.name == serving for function in functions):
                    raise ApiError(ErrorCode.NOT_FOUND, f"task {task_id!r} would have no function {serving!r}")
            info = TaskInfo(
                task_id=task_id,
                task_name=request.task_name or task_id,
                artifact_spec=artifact,
                description=request.description,
                functions=functions,
                metadata=request.metadata,
            )
            registered = TaskRegistered(task_id=task_id, at=contract.format_timestamp(time.time()), task=info)
            try:
                seq = await self.registry_store.append(registered, expect_last_seq=seq)
            except AppendConflict:
                continue  # another registration or deletion of this id came first: look again
            self._apply_registry(registered, seq)
            return RegisterTaskResponse(
                success=True, task_id=task_id, message="Task registered", task=self.tasks.get(task_id), created=True
            )
        raise ApiError(ErrorCode.INTERNAL, f"task {task_id!r} kept changing while being registered")

    async def _functions(self, spec: ArtifactSpec, located: artifacts.Located) -> list[FunctionInfo]:
        if spec.artifact_type == "process":
            return artifacts.process_functions(spec)
        return await asyncio.to_thread(artifacts.describe_python, located)

    def _apply_registry(self, event: TaskRegistered | TaskDeleted, seq: int) -> None:
        if self.tasks.registered is not None:
            self.tasks.registered.apply(event, seq)

    # --- DeleteTask ----------------------------------------------------------------------------

    async def delete_task(self, request: DeleteTaskRequest) -> DeleteTaskResponse:
        """Delete a registered task: afterwards invoking it is NOT_FOUND. Live executions make it
        FAILED_PRECONDITION unless `force`, which cancels them; `cleanup_executions` then removes
        the history of all its executions, leaving expired markers."""
        task_id = contract.validate_id(request.task_id, "task_id")
        if not self.settings.tasks.allow_registration:
            raise ApiError(
                ErrorCode.PERMISSION_DENIED, "task registration is off on this server ([tasks] allow_registration)"
            )
        if task_id in self.tasks.code:
            raise ApiError(
                ErrorCode.FAILED_PRECONDITION, f"task {task_id!r} is served from code: stop its workers instead"
            )
        last = await self.registry_store.last(task_id)
        if last is None or not isinstance(last[0], TaskRegistered):
            raise ApiError(ErrorCode.NOT_FOUND, f"task {task_id!r} is not registered")
        live = [s for s in await self._task_executions(task_id) if not s.terminal]
        if live and not request.force:
            raise ApiError(
                ErrorCode.FAILED_PRECONDITION,
                f"task {task_id!r} has {len(live)} pending or running execution(s); delete with force to cancel them",
            )
        deleted = TaskDeleted(task_id=task_id, at=contract.format_timestamp(time.time()), force=request.force)
        try:
            seq = await self.registry_store.append(deleted, expect_last_seq=last[1])
        except AppendConflict:
            raise ApiError(ErrorCode.FAILED_PRECONDITION, f"task {task_id!r} changed meanwhile; try again") from None
        self._apply_registry(deleted, seq)
        # From here on no new invocation is accepted; cancel what is live, including any accepted
        # between the check above and the deletion.
        cancelled = 0
        states = await self._task_executions(task_id)
        for state in states:
            if not state.terminal:
                reply = await self.cancel(
                    CancelExecutionRequest(
                        execution_id=state.execution_id, reason=f"task {task_id} deleted", force=True
                    )
                )
                cancelled += reply.final_status == ExecutionStatus.CANCELLED
        cleaned = await self._cleanup(states) if request.cleanup_executions else 0
        return DeleteTaskResponse(
            success=True,
            message=f"task {task_id!r} deleted",
            deleted=True,
            cancelled_executions=cancelled,
            cleaned_executions=cleaned,
        )

    async def _task_executions(self, task_id: str) -> list[ExecutionState]:
        """Every execution of the task, read from the log (the projection may lag behind it): its
        `requested` events (the task's own subject), and the states of just those executions
        (`multi_last` reads). A scan of every task's states took 4-10 s a time where results of
        megabytes were kept, twice per delete (probe28: 8-20 s, past the SDK's 10 s)."""
        requested = await self.stream.stored(self.names.event(task_id, "*", "requested"), 0, 1_000_000)
        bucket = self.names.state_bucket
        subjects = [f"$KV.{bucket}.{self.names.state_key(stored.event.execution_id)}" for stored in requested]
        kept = await directget.newest_of(self.nc, f"KV_{bucket}", subjects, self.timeout)
        known = {state.execution_id: state for found in kept if (state := state_of(found)) is not None}
        found = []
        for stored in requested:
            state = known.get(stored.event.execution_id)
            if state is None or not state.terminal:
                state = await self.execution_state(stored.event.execution_id)
            if state is not None:
                found.append(state)
        return found

    async def _cleanup(self, states: list[ExecutionState]) -> int:
        """Remove the executions' history once the projection has recorded their ends (else it
        would write their state back), leaving expired markers."""
        kv = self.state_kv
        if kv is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "the service has not started")
        timeout = self.settings.nats.request_timeout_ms / 1000
        cleaned = 0
        for state in states:
            ended = await self._recorded_end(kv, state.execution_id)
            ttl_s = marker_ttl_s(self.settings)
            await expire(
                self.nc,
                self.names,
                kv,
                ended or state,
                ttl_s,
                timeout,
                removed_by=TASK_CLEANUP,
                retention_hours=self.settings.async_execution.status_retention_hours,
            )
            cleaned += 1
        return cleaned

    async def _recorded_end(self, kv: KeyValue, execution_id: str) -> ExecutionState | None:
        async def projected() -> ExecutionState | None:
            try:
                entry = await kv.get(self.names.state_key(execution_id))
            except (KeyNotFoundError, KeyDeletedError):
                return None
            return decode_state(entry.value) if entry.value else None

        try:
            return await poll_until(
                projected, lambda s: s is not None and s.terminal, timeout_s=SETTLE_S, interval_s=0.05
            )
        except DeadlinePassed:
            return None


def _derived_id(spec: ArtifactSpec, checksum: str) -> str:
    """A server-made task id that names the artifact, so registering it again without an id is
    idempotent too."""
    named = f"{spec.artifact_type}\0{spec.location}\0{checksum}"
    if spec.metadata:  # other functions of the same file are another artifact (ids without stay as they were)
        named += "\0" + msgspec.json.encode(spec.metadata, order="sorted").decode()
    return f"task-{hashlib.sha256(named.encode()).hexdigest()[:16]}"
