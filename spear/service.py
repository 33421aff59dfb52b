"""The operations of spear, written once: both the NATS gateway and the HTTP API call these.

Each operation takes the raw request body, validates all of it before anything is written, and
returns a contract Struct or raises ApiError. The log is the truth: invocations are appended to
it, and status is read from the projection, topped up from the stream so a reply is never older
than what the caller already saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import platform
import resource
import time
from collections import Counter
from typing import AsyncIterator

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from spear import contract, topology, views
from spear.completions import Completions
from spear.config import Settings
from spear.contract import (
    ApiError,
    CancelExecutionRequest,
    CancelExecutionResponse,
    ExecutionResult,
    GetExecutionStatusRequest,
    GetExecutionStatusResponse,
    GetHealthRequest,
    GetHealthResponse,
    GetStatsRequest,
    GetStatsResponse,
    GetTaskRequest,
    GetTaskResponse,
    HealthDetails,
    InvokeFunctionRequest,
    InvokeFunctionResponse,
    ListExecutionsRequest,
    ListExecutionsResponse,
    ListTasksRequest,
    ListTasksResponse,
    ServiceStats,
    TaskStats,
)
from spear.admission import Admission
from spear.events import CancelRequested, Cancelled, Requested, decode_event, is_terminal
from spear.ids import new_execution_id
from spear.projection import read_function_stats
from spear.registry import TaskDirectory
from spear.retention import expired_marker
from spear.state import ExecutionState, decode_state, execution_info, execution_result, fold
from spear.store import AppendConflict, EventStore, Stored
from spear.subjects import Names
from spear.tracecontext import child_traceparent

log = logging.getLogger(__name__)

ESTIMATE_CACHE_S = 1.0


class Service:
    def __init__(self, nc: Client, settings: Settings):
        self.nc = nc
        self.settings = settings
        self.names = Names(settings.subject_prefix)
        self.store = EventStore(nc, self.names, settings.nats.request_timeout_ms / 1000)
        self.completions = Completions(nc, self.names)
        self.admission = Admission(nc, self.names, settings)
        self.tasks = TaskDirectory()
        self.state_kv: KeyValue | None = None
        self._estimates: dict[str, tuple[float, int]] = {}
        self.started = time.monotonic()

    async def start(self) -> None:
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        js = self.nc.jetstream()
        self.state_kv = await js.key_value(self.names.state_bucket)
        await self.tasks.start(await js.key_value(self.names.tasks_bucket))
        await self.completions.start()

    async def stop(self) -> None:
        await self.completions.stop()
        await self.tasks.stop()

    # --- InvokeFunction ------------------------------------------------------------------------

    async def invoke(self, body: bytes, traceparent: str | None = None) -> InvokeFunctionResponse:
        request = contract.decode_request(body, InvokeFunctionRequest, self.settings.api.max_request_bytes)
        event, client_chose_id = self._requested_event(request)
        self._check_function(event.task_id, event.function_name)
        sync = event.execution_mode == contract.SYNC
        if sync:
            self.admission.enter_sync()
        else:
            await self.admission.check_queue(event.task_id)
        waiter = self.completions.expect(event.execution_id) if sync else None
        try:
            try:
                appended = await self.store.append(
                    event,
                    expect_last_seq=0 if client_chose_id else None,
                    msg_id=f"{event.execution_id}:requested",
                    headers={"traceparent": child_traceparent(traceparent)},
                )
                existing = appended.duplicate
            except AppendConflict:
                existing = True
            state = await self._existing(event) if existing else None
            if not sync:
                if not existing:
                    self.admission.accepted(event.task_id)
                return await self._accepted(event, state)
            if state is not None and state.terminal:
                return _finished(event, state.result)
            return await self._wait(event, waiter)
        finally:
            if waiter is not None:
                self.completions.forget(event.execution_id, waiter)
                self.admission.leave_sync()

    def _requested_event(self, request: InvokeFunctionRequest) -> tuple[Requested, bool]:
        task_id = contract.validate_id(request.task_id, "task_id")
        function_name = contract.validate_id(request.function_name, "function_name")
        invocation_type = contract.parse_enum(request.invocation_type, contract.INVOCATION_TYPES, "invocation_type")
        if invocation_type != "INVOCATION_TYPE_EXISTING_TASK":
            raise ApiError(contract.INVALID_ARGUMENT, "INVOCATION_TYPE_NEW_TASK is not supported yet")
        mode = contract.parse_enum(request.execution_mode, contract.EXECUTION_MODES, "execution_mode")
        if mode == contract.STREAM:
            raise ApiError(contract.INVALID_ARGUMENT, "EXECUTION_MODE_STREAM is not supported yet")
        client_chose_id = request.execution_id is not None
        execution_id = (
            contract.validate_id(request.execution_id, "execution_id") if client_chose_id else new_execution_id()
        )
        parameters = _parameters(request)
        ctx = request.context
        if ctx.timeout_ms < 0:
            raise ApiError(contract.INVALID_ARGUMENT, "context.timeout_ms must not be negative")
        if ctx.max_retries is not None and ctx.max_retries < 0:
            raise ApiError(contract.INVALID_ARGUMENT, "context.max_retries must not be negative")
        section = self.settings.sync_execution if mode == contract.SYNC else self.settings.async_execution
        default_retries = section.max_retries if section.enable_retries else 0
        event = Requested(
            execution_id=execution_id,
            task_id=task_id,
            function_name=function_name,
            at=contract.format_timestamp(time.time()),
            execution_mode=mode,
            parameters=parameters,
            timeout_ms=ctx.timeout_ms or section.default_timeout_ms,
            max_retries=default_retries if ctx.max_retries is None else ctx.max_retries,
            fingerprint=_fingerprint(task_id, function_name, parameters),
            context=ctx,
            invocation_metadata=request.invocation_metadata,
        )
        return event, client_chose_id

    def _check_function(self, task_id: str, function_name: str) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(contract.NOT_FOUND, f"task {task_id!r} is not registered")
        if not task.has_function(function_name):
            raise ApiError(contract.NOT_FOUND, f"task {task_id!r} has no function {function_name!r}")

    async def _existing(self, event: Requested) -> ExecutionState:
        """The execution already stored under this id: the same request joins it, another is refused."""
        state = fold(await self.store.history(event.execution_id))
        if state is None:
            raise ApiError(contract.INTERNAL, f"execution {event.execution_id} exists but has no requested event")
        if (state.task_id, state.function_name, state.fingerprint) != (
            event.task_id,
            event.function_name,
            event.fingerprint,
        ):
            raise ApiError(
                contract.ALREADY_EXISTS,
                f"execution_id {event.execution_id!r} is already used by a different request",
            )
        return state

    async def _accepted(self, event: Requested, state: ExecutionState | None) -> InvokeFunctionResponse:
        result = execution_result(state) if state else ExecutionResult(status=contract.PENDING)
        return InvokeFunctionResponse(
            success=True,
            message="Execution accepted" if state is None else "Execution already exists",
            execution_id=event.execution_id,
            task_id=event.task_id,
            result=result,
            status_endpoint=contract.status_endpoint(event.execution_id),
            estimated_completion_ms=0 if result.status in contract.TERMINAL_STATUSES else await self._estimate(event),
        )

    async def _wait(self, event: Requested, waiter: asyncio.Future[ExecutionResult]) -> InvokeFunctionResponse:
        wait_s = (event.timeout_ms * (event.max_retries + 1) + self.settings.sync_execution.wait_grace_ms) / 1000
        try:
            return _finished(event, await asyncio.wait_for(asyncio.shield(waiter), wait_s))
        except asyncio.TimeoutError:
            pass
        last = await self.store.last(event.execution_id)  # a notification may have been missed
        if last is not None and is_terminal(last.event):
            return _finished(event, last.event.result)
        return InvokeFunctionResponse(
            success=False,
            error_code=contract.DEADLINE_EXCEEDED,
            message=f"the execution did not finish within {wait_s:.3f} s; it goes on, query its status",
            execution_id=event.execution_id,
            task_id=event.task_id,
            result=None,
            status_endpoint=contract.status_endpoint(event.execution_id),
        )

    async def _estimate(self, event: Requested) -> int:
        key = self.names.function_stats_key(event.task_id, event.function_name)
        now = time.monotonic()
        cached = self._estimates.get(key)
        if cached and now - cached[0] < ESTIMATE_CACHE_S:
            return cached[1]
        estimate = (await read_function_stats(self.state_kv, key)).estimate_ms()
        self._estimates[key] = (now, estimate)
        return estimate

    # --- GetExecutionStatus --------------------------------------------------------------------

    async def status(self, body: bytes) -> GetExecutionStatusResponse:
        request = contract.decode_request(body, GetExecutionStatusRequest, self.settings.api.max_request_bytes)
        execution_id = contract.validate_id(request.execution_id, "execution_id")
        state = await self.execution_state(execution_id)
        if state is None:
            return GetExecutionStatusResponse(found=False, message=await self._not_found_message(execution_id))
        return GetExecutionStatusResponse(
            found=True,
            message="",
            result=execution_result(state) if request.include_result else None,
            execution=execution_info(state),
        )

    async def _not_found_message(self, execution_id: str) -> str:
        expired = await expired_marker(self.state_kv, self.names, execution_id)
        if expired is None:
            return f"no execution with id {execution_id!r}"
        hours = self.settings.async_execution.status_retention_hours
        return (
            f"execution {execution_id!r} expired at {expired.expired_at}: it ended {expired.status} at "
            f"{expired.completed_at}, and ended executions are kept {hours:g} hours"
        )

    async def execution_state(self, execution_id: str) -> ExecutionState | None:
        """The projection's state, topped up with events it has not applied yet."""
        state = None
        try:
            entry = await self.state_kv.get(self.names.state_key(execution_id))
            state = decode_state(entry.value)
        except (KeyNotFoundError, KeyDeletedError):
            pass
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            raise ApiError(contract.UNAVAILABLE, "the state bucket did not answer") from None
        if state is not None and state.terminal:
            return state
        newer = await self.store.history(execution_id, after_seq=state.last_seq if state else 0)
        return fold(newer, state)

    # --- CancelExecution -----------------------------------------------------------------------

    async def cancel(self, body: bytes) -> CancelExecutionResponse:
        """Pending: cancelled at once, it never starts. Running: a `cancel_requested` event asks its
        worker to stop it (with `force`, `cancelled` is stored at once); the reply waits up to
        `worker.cancel_grace_ms` for the final status. Terminal: FAILED_PRECONDITION."""
        request = contract.decode_request(body, CancelExecutionRequest, self.settings.api.max_request_bytes)
        execution_id = contract.validate_id(request.execution_id, "execution_id")
        for _ in range(5):  # each pass works from a fresh read; a conflict means the execution moved
            history = await self.store.history(execution_id)
            state = fold(history)
            if state is None:
                return _cancel_reply(False, contract.UNKNOWN, f"no execution with id {execution_id!r}", contract.NOT_FOUND)
            if state.terminal:
                return _cancel_reply(
                    False, state.status, f"execution already ended {state.status}", contract.FAILED_PRECONDITION
                )
            common = dict(
                execution_id=execution_id,
                task_id=state.task_id,
                function_name=state.function_name,
                at=contract.format_timestamp(time.time()),
                attempt=state.attempt,
            )
            waiter = self.completions.expect(execution_id)
            try:
                last_seq = history[-1].seq
                if state.status == contract.RUNNING:
                    ask = CancelRequested(**common, reason=request.reason, force=request.force)
                    last_seq = (await self.store.append(ask, expect_last_seq=last_seq)).seq
                if state.status == contract.PENDING or request.force:
                    await self.store.append(_cancelled(common, state, request.reason), expect_last_seq=last_seq)
                    return _cancel_reply(True, contract.CANCELLED, "execution cancelled")
                grace_s = self.settings.worker.cancel_grace_ms / 1000
                try:
                    result = await asyncio.wait_for(asyncio.shield(waiter), grace_s)
                except asyncio.TimeoutError:
                    return _cancel_reply(True, contract.RUNNING, "cancellation requested; the function has not stopped yet")
                return _cancel_reply(True, result.status, f"execution ended {result.status}")
            except AppendConflict:
                continue
            finally:
                self.completions.forget(execution_id, waiter)
        raise ApiError(contract.INTERNAL, f"execution {execution_id} kept changing while being cancelled")

    # --- events ----------------------------------------------------------------------------------

    async def events(self, execution_id: str) -> list[Stored]:
        """The execution's stored events in order; NOT_FOUND if it has none."""
        contract.validate_id(execution_id, "execution_id")
        history = await self.store.history(execution_id)
        if not history:
            raise ApiError(contract.NOT_FOUND, f"no execution with id {execution_id!r}")
        return history

    async def follow(self, execution_id: str, after_seq: int = 0, idle_s: float = 15.0) -> AsyncIterator[Stored | None]:
        """Stored events after `after_seq`, then live ones as they are stored, until the terminal
        event. Yields None after `idle_s` without an event (for keep-alives)."""
        live: asyncio.Queue = asyncio.Queue()

        async def enqueue(msg) -> None:
            live.put_nowait(msg)

        sub = await self.nc.subscribe(self.names.execution_events(execution_id), cb=enqueue)
        try:
            last = after_seq
            while True:
                # The history read comes after subscribing, so no event falls in between; it also
                # fills any gap the live subscription left (it is at-most-once).
                for stored in await self.store.history(execution_id, after_seq=last):
                    yield stored
                    last = stored.seq
                    if is_terminal(stored.event):
                        return
                try:
                    msg = await asyncio.wait_for(live.get(), idle_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                seq = int((msg.headers or {}).get("Nats-Sequence", 0))
                if seq > last:
                    event = decode_event(msg.data)
                    yield Stored(event, seq)
                    last = seq
                    if is_terminal(event):
                        return
        finally:
            await sub.unsubscribe()

    # --- ListExecutions, tasks, health, stats --------------------------------------------------

    async def list_executions(self, body: bytes) -> ListExecutionsResponse:
        request = contract.decode_request(body, ListExecutionsRequest, self.settings.api.max_request_bytes)
        status = contract.parse_enum(request.status_filter, contract.STATUSES, "status") if request.status_filter else ""
        return views.list_executions(await self._states(), request, status)

    async def get_task(self, body: bytes) -> GetTaskResponse:
        request = contract.decode_request(body, GetTaskRequest, self.settings.api.max_request_bytes)
        task_id = contract.validate_id(request.task_id, "task_id")
        task = self.tasks.get(task_id)
        if task is None:
            return GetTaskResponse(found=False, message=f"task {task_id!r} is not registered")
        states = await self._states()
        executions = []
        if request.include_executions:
            mine = sorted((s for s in states if s.task_id == task_id), key=lambda s: s.execution_id, reverse=True)
            executions = [execution_info(s) for s in mine[: request.execution_limit]]
        return GetTaskResponse(found=True, task=views.with_execution_counts(task, states), executions=executions)

    async def list_tasks(self, body: bytes) -> ListTasksResponse:
        request = contract.decode_request(body, ListTasksRequest, self.settings.api.max_request_bytes)
        chosen = [
            task
            for task_id, task in sorted(self.tasks.tasks.items())
            if task_id.startswith(request.prefix) and task_id > request.start_after
        ]
        page = chosen[: request.limit]
        if request.include_details:
            states = await self._states()
            page = [views.with_execution_counts(task, states) for task in page]
        has_more = len(chosen) > len(page)
        return ListTasksResponse(tasks=page, has_more=has_more, next_start_after=page[-1].task_id if has_more else "")

    async def health(self, body: bytes = b"{}") -> GetHealthResponse:
        """healthy: this gateway, a projection and a worker answer; degraded: invocations are
        accepted but something that runs or records them is missing; unhealthy: no NATS."""
        request = contract.decode_request(body or b"{}", GetHealthRequest, self.settings.api.max_request_bytes)
        components = {
            "nats": self.nc.is_connected,
            "projection": await self._answers(self.names.projection_service_name),
            "worker": await self._answers(self.names.worker_service_name),
        }
        if all(components.values()):
            status, message = "healthy", "serving"
        elif components["nats"]:
            missing = ", ".join(name for name, up in components.items() if not up)
            status, message = "degraded", f"no {missing} answers"
        else:
            status, message = "unhealthy", "not connected to NATS"
        details = None
        if request.include_details and components["nats"]:
            stats = views.execution_stats(await self._states())
            details = HealthDetails(
                active_tasks=len(self.tasks.tasks),
                running_executions=stats.running_executions,
                pending_executions=stats.pending_executions,
                total_memory_used=_memory_used(),
                total_executions=sum(stats.executions_by_function.values()),
                system_info={"python": platform.python_version(), "platform": platform.platform()},
            )
        return GetHealthResponse(
            status=status, message=message, uptime_seconds=self._uptime(), details=details, components=components
        )

    async def stats(self, body: bytes = b"{}") -> GetStatsResponse:
        request = contract.decode_request(body or b"{}", GetStatsRequest, self.settings.api.max_request_bytes)
        states = views.within_hours(await self._states(), request.time_range_hours)
        busy = {s.task_id for s in states if not s.terminal}
        tasks = [views.with_execution_counts(task, states) for task in self.tasks.tasks.values()]
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        return GetStatsResponse(
            service_stats=ServiceStats(
                uptime_seconds=self._uptime(),
                total_tasks=len(self.tasks.tasks),
                total_executions=len(states),
                total_memory_used=_memory_used(),
                cpu_usage_percent=round(100.0 * (cpu.ru_utime + cpu.ru_stime) / max(1.0, time.monotonic() - self.started), 2),
            ),
            task_stats=TaskStats(
                active_tasks=len(busy & set(self.tasks.tasks)),
                idle_tasks=len(set(self.tasks.tasks) - busy),
                tasks_by_type=dict(Counter((t.artifact_spec or {}).get("artifact_type", "unknown") for t in tasks)),
                most_active_tasks=sorted(tasks, key=lambda t: -t.execution_count)[:5],
            )
            if request.include_task_stats
            else None,
            execution_stats=views.execution_stats(states) if request.include_execution_stats else None,
        )

    async def _states(self) -> list[ExecutionState]:
        return await views.scan_states(self.nc, self.names.state_bucket, self.store.timeout)

    def _uptime(self) -> int:
        return int(time.monotonic() - self.started)

    async def _answers(self, service_name: str) -> bool:
        try:
            await self.nc.request(f"$SRV.PING.{service_name}", b"", timeout=0.5)
            return True
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError):
            return False


def _memory_used() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS; Linux reports KiB


def _cancel_reply(success: bool, final_status: str, message: str, error_code: str = "") -> CancelExecutionResponse:
    return CancelExecutionResponse(success=success, message=message, final_status=final_status, error_code=error_code)


def _cancelled(common: dict, state: ExecutionState, reason: str) -> Cancelled:
    result = ExecutionResult(
        status=contract.CANCELLED,
        error_code=contract.CANCELLED_ERROR,
        error_message=f"cancelled: {reason or 'on request'}",
        started_at=state.started_at,
        completed_at=common["at"],
        attempt=state.attempt,
    )
    return Cancelled(**common, result=result, reason=reason)


def _parameters(request: InvokeFunctionRequest) -> dict[str, object]:
    parameters: dict[str, object] = {}
    for parameter in request.parameters:
        if not parameter.name.isidentifier():
            raise ApiError(contract.INVALID_ARGUMENT, f"parameter name {parameter.name!r} is not an identifier")
        if parameter.name in parameters:
            raise ApiError(contract.INVALID_ARGUMENT, f"parameter {parameter.name!r} is given twice")
        parameters[parameter.name] = parameter.value
    return parameters


def _fingerprint(task_id: str, function_name: str, parameters: dict[str, object]) -> str:
    canonical = msgspec.json.encode([task_id, function_name, parameters], order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:32]


def _finished(event: Requested, result: ExecutionResult) -> InvokeFunctionResponse:
    messages = {
        contract.COMPLETED: "Function executed successfully",
        contract.FAILED: "Function execution failed",
        contract.TIMEOUT: "Function execution timed out",
        contract.CANCELLED: "Function execution was cancelled",
    }
    return InvokeFunctionResponse(
        success=True,
        message=messages.get(result.status, result.status),
        execution_id=event.execution_id,
        task_id=event.task_id,
        result=result,
    )
