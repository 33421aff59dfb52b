"""The operations of spear, written once: both the NATS gateway and the HTTP API call these.

Each operation takes the raw request body, validates all of it before anything is written, and
returns a contract Struct or raises ApiError. This module holds the writes (invoke, cancel) and
the service's set-up; the reads are in `reads.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue

from spear.core import contract
from spear.core.config import Settings
from spear.core.contract import (
    ApiError,
    CancelExecutionRequest,
    CancelExecutionResponse,
    ExecutionResult,
    InvokeFunctionRequest,
    InvokeFunctionResponse,
)
from spear.core.events import Cancelled, CancelRequested, Requested, is_terminal
from spear.core.ids import new_execution_id
from spear.core.names import Names
from spear.core.redact import Redactor
from spear.core.state import ExecutionState, execution_result, fold
from spear.core.tracecontext import child_traceparent
from spear.jetstream import topology
from spear.jetstream.store import AppendConflict, EventStore
from spear.projection.projection import read_function_stats
from spear.service.admission import Admission
from spear.service.completions import Completions
from spear.service.reads import Reads
from spear.service.registry import TaskDirectory, check_parameters

log = logging.getLogger(__name__)

ESTIMATE_CACHE_S = 1.0


class Service(Reads):
    """The operations of spear: the writes here (invoke, cancel), the reads in `Reads`."""

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
        self.redactor = Redactor(settings.api.redact_keys)

    async def start(self) -> None:
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        js = self.nc.jetstream()
        self.state_kv = await js.key_value(self.names.state_bucket)
        await self.tasks.start(await js.key_value(self.names.tasks_bucket))
        await self.completions.start()
        await self.nc.flush()  # completion subscriptions are live before the first invocation

    async def stop(self) -> None:
        await self.completions.stop()
        await self.tasks.stop()

    # --- InvokeFunction ------------------------------------------------------------------------

    async def invoke(
        self, body: bytes, traceparent: str | None = None, mode: str | None = None
    ) -> InvokeFunctionResponse:
        """InvokeFunction; `mode` overrides the request's execution mode (StreamFunction: STREAM)."""
        request = contract.decode_request(body, InvokeFunctionRequest, self.settings.api.max_request_bytes)
        if mode is not None:
            request.execution_mode = mode
        event, client_chose_id = self._requested_event(request)
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
        chosen_id = request.execution_id if request.execution_id is not None else (request.context.execution_id or None)
        client_chose_id = chosen_id is not None
        execution_id = contract.validate_id(chosen_id, "execution_id") if client_chose_id else new_execution_id()
        parameters = _parameters(request)
        ctx = request.context
        if ctx.timeout_ms < 0:
            raise ApiError(contract.INVALID_ARGUMENT, "context.timeout_ms must not be negative")
        if ctx.max_retries is not None and ctx.max_retries < 0:
            raise ApiError(contract.INVALID_ARGUMENT, "context.max_retries must not be negative")
        function = self.tasks.function(task_id, function_name)
        check_parameters(function, list(parameters))
        # Defaults: the request's own values, else the function's, else the execution mode's
        # (STREAM is queued and answered at once, as ASYNC is: it takes ASYNC's defaults).
        section = self.settings.sync_execution if mode == contract.SYNC else self.settings.async_execution
        default_retries = section.max_retries if section.enable_retries else 0
        if function.max_retries is not None:
            default_retries = function.max_retries
        event = Requested(
            execution_id=execution_id,
            task_id=task_id,
            function_name=function_name,
            at=contract.format_timestamp(time.time()),
            execution_mode=mode,
            parameters=parameters,
            timeout_ms=ctx.timeout_ms or function.timeout_ms or section.default_timeout_ms,
            max_retries=default_retries if ctx.max_retries is None else ctx.max_retries,
            fingerprint=_fingerprint(task_id, function_name, parameters),
            context=ctx,
            invocation_metadata=request.invocation_metadata,
        )
        return event, client_chose_id

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
            stream_subject=self.names.execution_events(event.execution_id)
            if event.execution_mode == contract.STREAM
            else "",
        )

    async def _wait(self, event: Requested, waiter: asyncio.Future[ExecutionResult]) -> InvokeFunctionResponse:
        wait_s = (event.timeout_ms * (event.max_retries + 1) + self.settings.sync_execution.wait_grace_ms) / 1000
        try:
            return _finished(event, await asyncio.wait_for(asyncio.shield(waiter), wait_s))
        except TimeoutError:
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
                return _cancel_reply(
                    False, contract.UNKNOWN, f"no execution with id {execution_id!r}", contract.NOT_FOUND
                )
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
                except TimeoutError:
                    return _cancel_reply(
                        True, contract.RUNNING, "cancellation requested; the function has not stopped yet"
                    )
                return _cancel_reply(True, result.status, f"execution ended {result.status}")
            except AppendConflict:
                continue
            finally:
                self.completions.forget(execution_id, waiter)
        raise ApiError(contract.INTERNAL, f"execution {execution_id} kept changing while being cancelled")


def _cancel_reply(success: bool, final_status: str, message: str, error_code: str = "") -> CancelExecutionResponse:
    return CancelExecutionResponse(success=success, message=message, final_status=final_status, error_code=error_code)


def _cancelled(common: dict, state: ExecutionState, reason: str) -> Cancelled:
    result = ExecutionResult(
        status=contract.CANCELLED,
        error_code=contract.CANCELLED_ERROR,
        error_message=f"cancelled: {reason or 'on request'}",
        started_at=state.started_at,
        completed_at=common["at"],
        execution_time_ms=contract.elapsed_ms(state.started_at, common["at"]),
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
