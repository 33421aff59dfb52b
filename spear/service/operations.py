"""The operations of spear, written once: both the NATS gateway and the HTTP API call these.

Each operation takes a decoded request Struct (the adapters own bytes: `spear.api.table`),
validates all of it before anything is written, and returns a reply Struct or raises ApiError
(store and NATS errors pass through; the adapters map them). This module holds the writes
(invoke, cancel) and the service's set-up; the reads are in `reads.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from spear.aio import SharedReads
from spear.core import contract
from spear.core.config import STOP_GRACE_S, Settings
from spear.core.contract import (
    CancelExecutionRequest,
    CancelExecutionResponse,
    ExecutionResult,
    InvokeFunctionRequest,
    InvokeFunctionResponse,
    RegisterTaskRequest,
)
from spear.core.convert import api_result, execution_result, stored_context
from spear.core.enums import ApiError, ErrorCode, ExecutionMode, ExecutionStatus, InvocationType
from spear.core.events import Requested, StoredResult, is_terminal
from spear.core.eventstore import (
    AppendConflict,
    Appended,
    EventStore,
    Stored,
    StoreError,
    StoreNotReached,
    StoreUnavailable,
)
from spear.core.ids import new_execution_id
from spear.core.names import Names
from spear.core.numbers import canonical_json
from spear.core.redact import Redactor
from spear.core.state import ExecutionState, attempts_ms, fold
from spear.jetstream import topology
from spear.jetstream.registrystore import RegistryStore
from spear.jetstream.store import JetStreamStore, OnStored
from spear.projection.functiontimes import read_function_stats
from spear.service import views
from spear.service.admission import Admission, QueueDepth
from spear.service.callerwait import caller_made_new_id, caller_may_register, gateway_wait_s, shown_wait_s
from spear.service.completions import Completions, WaitsEnded
from spear.service.fanout import SharedReaders
from spear.service.reads import Reads
from spear.service.registry import TaskDirectory, check_parameters
from spear.service.slots import WorkerSlots
from spear.service.taskops import TaskOperations
from spear.service.writes import record_request, requested_msg_id, store_cancel
from spear.telemetry import logs, metrics

if TYPE_CHECKING:
    from spear.service.inline import InlineCalls
    from spear.worker.tasks import Task

log = logging.getLogger(__name__)

CANCEL_TRIES = 50  # each after reading only what was stored since the last
ESTIMATE_CACHE_S = 1.0
ESTIMATE_WAIT_S = 0.25  # a stored invocation's reply waits at most this long for its estimate's figures
FALLBACK_RUN_MS = 50  # the run time assumed for a function with no finished execution yet (documented)
QUEUE_GAUGE_AGE_S = 0.5  # a scrape shows queue figures read at most this long ago
# A SYNC wait whose completions could not be followed yet reads the log after this long, then
# twice as long each time up to LOG_READ_MAX_S (until they are followed, or its deadline).
LOG_READ_FIRST_S = 0.02
LOG_READ_MAX_S = 0.5
LAST_READ_S = 0.1  # how long past a SYNC wait's end its last read of the log may take


class Service(Reads, TaskOperations):
    """The operations of spear: the writes here (invoke, cancel), the reads in `Reads`, the
    registration and deletion of tasks in `TaskOperations`."""

    def __init__(
        self, nc: Client, settings: Settings, store: EventStore | None = None, inline_tasks: Sequence[Task] = ()
    ):
        """`inline_tasks`: code tasks loaded in this process, whose inline functions' SYNC calls
        are run here (`spear.service.inline`, unless `[api] inline_sync = false`)."""
        self.nc = nc
        self.settings = settings
        self.names = Names(settings.subject_prefix)
        self.timeout = settings.nats.request_timeout_ms / 1000
        self.stream = JetStreamStore(nc, self.names, self.timeout)
        self.store: EventStore = store or self.stream
        self.completions = Completions(nc, self.names)
        self.admission = Admission(nc, self.names, settings)
        self.slots = WorkerSlots(nc, self.names.worker_tasks)
        self.tallies = views.TallyCache(self._scan_tally, keep=self._keep_tally, recall=self._recall_tally)
        self.registry_store = RegistryStore(nc, self.names, self.timeout)
        self.tasks = TaskDirectory(self.registry_store)
        # Known here from code (`spear up` loads `[worker] tasks`, the demo too): invocations of
        # them are taken before any worker has published them (`spear up --workers 0`, workers
        # started later); what workers publish replaces these.
        self.tasks.code.update({task.task_id: task.info() for task in inline_tasks})
        self.state_kv: KeyValue | None = None
        self._estimates: dict[str, tuple[float, int, int]] = {}  # key -> (read at, run ms, wait ms)
        self._stats_reads: SharedReads[tuple[int, int]] = SharedReads()  # one KV read at a time per function
        self.started = time.monotonic()
        self.redactor = Redactor(settings.api.redact_keys)
        self.feeds = SharedReaders(nc)
        self.stop_grace_s = STOP_GRACE_S  # how long SYNC callers wait for their executions at a stop
        self._ending_waits: asyncio.Future[None] | None = None
        self.inline: InlineCalls | None = None
        if inline_tasks and settings.api.inline_sync:
            from spear.service.inline import InlineCalls  # the worker's code, only where it runs

            self.inline = InlineCalls(self.store, settings, list(inline_tasks), nc.max_payload)

    async def start(self) -> None:
        """Apply the topology and load the task directory (completions are followed once a wait
        needs them)."""
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        metrics.answer_status_queries()
        js = self.nc.jetstream()
        self.state_kv = await js.key_value(self.names.state_bucket)
        bucket = self.names.tasks_bucket
        key_count = await topology.subject_count(self.nc, f"KV_{bucket}", self.timeout)
        await self.tasks.start(await js.key_value(bucket), key_count)

    async def stop(self) -> None:
        """Stop listening (replies in flight are the adapters' to finish)."""
        await self.completions.stop()
        await self.tasks.stop()
        await self.feeds.stop()

    # --- InvokeFunction ------------------------------------------------------------------------

    async def invoke(self, request: InvokeFunctionRequest, mode: ExecutionMode | None = None) -> InvokeFunctionResponse:
        """Store a `requested` event (once, whatever the retries); SYNC waits for the result, ASYNC
        and STREAM reply at once. A client-chosen execution id joins an equal request, refuses
        another. `mode` overrides the request's execution mode (StreamFunction: STREAM). The event
        carries the current trace context: the adapter's span, under the caller's traceparent."""
        began = time.monotonic()  # a SYNC caller's wait counts from here
        if mode is not None:
            # The operation decides the mode, but what the request says must still be one (probe19:
            # stream_function took "FOO"); a body made for InvokeFunction may say SYNC.
            ExecutionMode.parse_input(request.execution_mode, "execution_mode", mode)
            request = msgspec.structs.replace(request, execution_mode=mode.value)
        request = await self._with_task(request)
        event, client_chose_id = self._requested_event(request)
        logs.set_execution(event.execution_id, event.task_id, event.function_name)
        sync = event.execution_mode == ExecutionMode.SYNC
        if sync:
            self.admission.enter_sync()
            metrics.sync_call(event.task_id, event.function_name, +1)
        # (an ASYNC invocation is counted in its task's queue until its append is answered)
        held = False if sync else await self._admitted(event, client_chose_id)
        waiter = self.completions.expect(event.execution_id) if sync else None
        try:
            unknown_id = client_chose_id and not caller_made_new_id.get()  # it may name an execution
            function = self.inline.function(event, unknown_id) if self.inline is not None else None
            if function is not None and waiter is not None and self.inline is not None:
                try:
                    end = await self.inline.run(event, function)
                except StoreUnavailable as exc:  # it ran; its chain may be stored all the same
                    # (even where its last append was taken by nothing: on a replicated stream
                    # its events are stored one by one, `requested` perhaps already: review62)
                    return _maybe_stored(event, exc, surely_not=False)
                if end is not None and is_terminal(end):
                    return _finished(event, end.result)
                # Retried by a worker, or taken over: its end may be stored before the
                # completions are followed, so the log is read once they are.
                followed = await self.completions.following()
                last = await self._last_or_none(event.execution_id)
                if last is not None and is_terminal(last.event):
                    return _finished(event, last.event.result)
                # (None: not read, so the gap is not closed: read again while waiting)
                return await self._wait(event, waiter, followed and last is not None, began)
            followed = waiter is not None and await self.completions.following()
            counted, held = held, False  # (from here `_record` releases it, whatever happens)
            recorded = await self._record(event, client_chose_id, counted, queued=waiter is None)
            if isinstance(recorded, InvokeFunctionResponse):
                return recorded
            state = None if isinstance(recorded, int) else recorded
            if waiter is None:
                return await self._accepted(event, state)
            if state is not None and state.terminal and state.result is not None:
                return _finished(event, state.result)
            return await self._wait(event, waiter, followed, began)
        finally:
            if waiter is not None:
                self.completions.forget(event.execution_id, waiter)
                self.admission.leave_sync()
                metrics.sync_call(event.task_id, event.function_name, -1)
            elif held:
                self._answered(event, held, None)

    async def _record(
        self, event: Requested, client_chose_id: bool, held: bool, queued: bool
    ) -> ExecutionState | int | InvokeFunctionResponse:
        """`record_request`, or UNAVAILABLE when JetStream did not answer. An invocation for the
        ASYNC queue (`queued`) is counted in by the outcome, and released if `held`: stored, not
        stored (an error, raised), or unknown (no answer, or the caller gone: nats-py sends what
        it holds all the same, so it may be stored, and counts; review20)."""
        try:
            recorded = await record_request(self.store, event, client_chose_id)
        except (StoreUnavailable, asyncio.CancelledError) as exc:
            self._answered(event, held, None, unanswered=not isinstance(exc, StoreNotReached))
            if isinstance(exc, StoreUnavailable):
                return _maybe_stored(event, exc)
            raise
        except BaseException:
            self._answered(event, held, None)
            raise
        if queued:  # (before the estimate, which counts it)
            self._answered(event, held, recorded if isinstance(recorded, int) else None)
        return recorded

    async def _admitted(self, event: Requested, client_chose_id: bool) -> bool:
        """Count an ASYNC invocation into its task's queue until its append is answered (True), or
        refuse it at the limit. An id of the caller's that names a stored execution adds nothing
        to the queue: not refused for capacity (False), it is joined or refused ALREADY_EXISTS
        (a client retrying after UNAVAILABLE was told RESOURCE_EXHAUSTED for its own execution)."""
        try:
            await self.admission.check_queue(event.task_id)
        except ApiError as exc:
            if not client_chose_id or exc.code != ErrorCode.RESOURCE_EXHAUSTED:
                raise
            if await self._last_or_none(event.execution_id) is None:
                raise
            return False
        self.admission.hold(event.task_id, event.execution_id)
        return True

    def _answered(self, event: Requested, held: bool, stored_at: int | None, unanswered: bool = False) -> None:
        """An ASYNC invocation's append was answered: out of the calls on their way, into its
        task's queue if it was stored (at `stored_at`; also one not held: its id named a stored
        execution a moment ago, and the append stored it all the same); `unanswered`: JetStream
        did not say (`Admission.release`)."""
        if held:
            self.admission.release(event.task_id, event.execution_id, stored_at, unanswered)
        elif stored_at is not None:
            self.admission.accepted(event.task_id, stored_at)

    async def _with_task(self, request: InvokeFunctionRequest) -> InvokeFunctionRequest:
        """NEW_TASK (or `create_if_not_exists` naming a missing task): register the task first
        (or find it registered with the same artifact), then invoke it as an existing task."""
        invocation_type = InvocationType.parse_input(
            request.invocation_type, "invocation_type", InvocationType.EXISTING_TASK
        )
        missing = request.create_if_not_exists and request.task_id and self.tasks.get(request.task_id) is None
        if invocation_type == InvocationType.EXISTING_TASK and not missing:
            return request
        if request.artifact_spec is None:
            if invocation_type == InvocationType.NEW_TASK:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, "a NEW_TASK invocation needs an artifact_spec")
            raise ApiError(  # (probe29: it said NEW_TASK of an EXISTING_TASK call)
                ErrorCode.NOT_FOUND,
                f"task {request.task_id!r} is not registered, and create_if_not_exists has no artifact_spec"
                " to register it from",
            )
        registered = await self.register_task(
            RegisterTaskRequest(
                task_id=request.task_id,
                task_name=request.task_name,
                description=request.task_description,
                artifact_spec=request.artifact_spec,
            ),
            serving=request.function_name,
            may_create=self.settings.tasks.nats_invoke_registers or caller_may_register.get(),
        )
        return msgspec.structs.replace(
            request, task_id=registered.task_id, invocation_type=InvocationType.EXISTING_TASK.value
        )

    def _requested_event(self, request: InvokeFunctionRequest) -> tuple[Requested, bool]:
        task_id = contract.validate_id(request.task_id, "task_id")
        function_name = contract.validate_id(request.function_name, "function_name")
        mode = ExecutionMode.parse_input(request.execution_mode, "execution_mode", ExecutionMode.SYNC)
        chosen_id = request.execution_id if request.execution_id is not None else (request.context.execution_id or None)
        client_chose_id = chosen_id is not None
        execution_id = contract.validate_id(chosen_id, "execution_id") if client_chose_id else new_execution_id()
        parameters = _parameters(request)
        ctx = request.context
        if ctx.timeout_ms < 0:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "context.timeout_ms must not be negative")
        if ctx.max_retries is not None and ctx.max_retries < 0:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, "context.max_retries must not be negative")
        limits = self.settings.api
        if ctx.timeout_ms > limits.timeout_ms_limit:
            message = f"context.timeout_ms {ctx.timeout_ms} is above the limit of {limits.timeout_ms_limit}"
            raise ApiError(ErrorCode.INVALID_ARGUMENT, message)
        if ctx.max_retries is not None and ctx.max_retries > limits.max_retries_limit:
            message = f"context.max_retries {ctx.max_retries} is above the limit of {limits.max_retries_limit}"
            raise ApiError(ErrorCode.INVALID_ARGUMENT, message)
        function = self.tasks.function(task_id, function_name)
        check_parameters(function, list(parameters))
        # Defaults: the request's own values, else the function's, else the execution mode's
        # (STREAM is queued and answered at once, as ASYNC is: it takes ASYNC's defaults).
        section = self.settings.sync_execution if mode == ExecutionMode.SYNC else self.settings.async_execution
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
            context=stored_context(ctx),
            invocation_metadata=request.invocation_metadata,
            force_new_instance=request.force_new_instance,
        )
        return event, client_chose_id

    def accept_now(self, request: InvokeFunctionRequest) -> tuple[Requested, int] | None:
        """An ASYNC invocation `invoke` would accept without waiting for anything but its append,
        made ready: its `requested` event and its estimate. The caller stores the event with
        `record_now` and answers with `accepted_now` (the NATS gateway, from a callback: no task
        per call). None, for `invoke` to take: a NEW_TASK or `create_if_not_exists`, an
        id of the client's (it may name an execution: joined or refused after a read), another
        mode, or a queue figure or estimate to read first. Raises what `invoke` would raise."""
        if request.execution_id is not None or request.context.execution_id or request.create_if_not_exists:
            return None
        if (
            ExecutionMode.parse_input(request.execution_mode, "execution_mode", ExecutionMode.SYNC)
            != ExecutionMode.ASYNC
        ):
            return None  # (before the event is made: a SYNC call would make it twice)
        invocation_type = InvocationType.parse_input(
            request.invocation_type, "invocation_type", InvocationType.EXISTING_TASK
        )
        if invocation_type != InvocationType.EXISTING_TASK:
            return None
        event, _ = self._requested_event(request)
        if not self.admission.queue_open_now(event.task_id):
            return None
        estimate = self._estimate_now(event)
        return None if estimate is None else (event, estimate)

    def record_now(self, event: Requested, on_stored: OnStored) -> bool:
        """Store the `requested` event `accept_now` made, as `invoke` does, without awaiting:
        `on_stored` gets the outcome for `accepted_now`. False (nothing sent): use `invoke`."""
        store = self.store
        msg_id = requested_msg_id(event.execution_id)
        self.admission.hold(event.task_id, event.execution_id)  # (accept_now found room: none admitted since)
        sent = False
        try:
            sent = isinstance(store, JetStreamStore) and store.append_now(event, msg_id, on_stored)
        finally:
            if not sent:
                self.admission.release(event.task_id, event.execution_id, None)
        return sent

    def accepted_now(self, event: Requested, estimate: int, stored: Appended | Exception) -> InvokeFunctionResponse:
        """The reply to an invocation `accept_now` made ready, once its append is answered (what
        `invoke` replies, or raises, for the same outcome); `estimate` is the one made then, for
        want of a newer."""
        stored_at = stored.seq if isinstance(stored, Appended) and not stored.duplicate else None
        unanswered = isinstance(stored, StoreUnavailable) and not isinstance(stored, StoreNotReached)
        self.admission.release(event.task_id, event.execution_id, stored_at, unanswered)
        if isinstance(stored, StoreUnavailable):
            return _maybe_stored(event, stored)
        if isinstance(stored, Exception):
            raise stored
        if stored.duplicate:  # the id is new: only a second append of this very event is a duplicate
            raise ApiError(ErrorCode.INTERNAL, f"execution_id {event.execution_id!r} was stored before")
        # read as `invoke` reads it, once stored: a queue read started before may have landed
        now = self._estimate_now(event)
        return self._accepted_reply(event, None, estimate if now is None else now)

    async def _accepted(self, event: Requested, state: ExecutionState | None) -> InvokeFunctionResponse:
        terminal = state is not None and execution_result(state).status.terminal
        return self._accepted_reply(event, state, 0 if terminal else await self._estimate_stored(event))

    def _accepted_reply(self, event: Requested, state: ExecutionState | None, estimate: int) -> InvokeFunctionResponse:
        result = execution_result(state) if state else ExecutionResult(status=ExecutionStatus.PENDING)
        return InvokeFunctionResponse(
            success=True,
            message=contract.ACCEPTED_MESSAGE if state is None else contract.JOINED_MESSAGE,
            execution_id=event.execution_id,
            task_id=event.task_id,
            result=result,
            status_endpoint=contract.status_endpoint(event.execution_id),
            estimated_completion_ms=estimate,
            # CONTRACT §8: `P.exec.<task>.<execution_id>.*`, the execution's events under its task
            stream_subject=self.names.event(event.task_id, event.execution_id, "*")
            if event.execution_mode == ExecutionMode.STREAM
            else "",
        )

    async def _wait(
        self, event: Requested, waiter: asyncio.Future[StoredResult], followed: bool, began: float
    ) -> InvokeFunctionResponse:
        """The execution's result, from the completions followed since before its end could be
        stored (`followed`), else from the log, read again and again until they are followed.
        The wait counts from `began`, when the call came."""
        sync = self.settings.sync_execution
        longest_ms = attempts_ms(event.timeout_ms, event.max_retries, self.settings.retry)
        wait_s = gateway_wait_s(min(longest_ms + sync.wait_grace_ms, sync.max_wait_ms))
        deadline = began + wait_s
        pause_s = LOG_READ_FIRST_S
        self.slots.of(event.task_id)  # (who serves it is known if the wait ends: gathered at most every 10 s)
        while True:
            left_s = max(0.0, deadline - time.monotonic())
            try:
                result = await asyncio.wait_for(asyncio.shield(waiter), left_s if followed else min(pause_s, left_s))
                return _finished(event, result)
            except TimeoutError:
                pass
            except WaitsEnded:  # (this gateway stops: the caller is answered before it closes)
                return await self._not_finished(event, "this gateway is stopping; the execution goes on")
            live = self.completions.live  # before the read: what is stored after it is delivered
            final = time.monotonic() >= deadline
            try:
                # (a read never outlasts the wait by more than LAST_READ_S: verify63, a stream's
                # leader lost, answered a caller's 3 s wait at 7.9 s, for its read's own timeout)
                async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + LAST_READ_S):
                    last = await self.store.last(event.execution_id)  # a notification may have been missed
            except (StoreError, TimeoutError) as exc:
                # At the deadline too: the caller is answered DEADLINE_EXCEEDED with the execution
                # id, which is stored and goes on (probe58: UNAVAILABLE without it, from a frozen node).
                log.info(
                    "SYNC wait for %s: the log could not be read (%s); %s",
                    event.execution_id,
                    str(exc) or f"no answer within {LAST_READ_S} s past the wait",
                    "answered as not finished" if final else "waiting on",
                )
                last = None
            if last is not None and is_terminal(last.event):
                return _finished(event, last.event.result)
            if final:
                break
            followed, pause_s = live, min(pause_s * 2, LOG_READ_MAX_S)
        why = f"the execution did not finish within {shown_wait_s(wait_s):.3f} s"
        if self.slots.unserved(event.task_id):  # (probe56: `spear up --workers 0`, and no word of it)
            why += f": no worker serves task {event.task_id!r} (start one: spear worker)"
        return await self._not_finished(event, f"{why}; it goes on")

    async def end_waits(self) -> None:
        """At a stop, before an adapter closes: SYNC callers still waiting after `stop_grace_s`
        (as long as a stopping worker lets their attempts run) are answered DEADLINE_EXCEEDED
        with their execution id (probe27: HTTP callers were cut off without a reply, though their
        executions ran and ended). One wait for every adapter: the first to stop starts it, one
        stopping meanwhile joins it (probe56: the HTTP API's 2 s ended the NATS callers' waits too, their
        results stored a second later)."""
        if self._ending_waits is None or self._ending_waits.done():
            self._ending_waits = asyncio.ensure_future(self.completions.end_waits(self.stop_grace_s))
        await asyncio.shield(self._ending_waits)

    async def _not_finished(self, event: Requested, why: str) -> InvokeFunctionResponse:
        """DEADLINE_EXCEEDED for a SYNC call answered before its execution ended (it goes on)."""
        return InvokeFunctionResponse(
            success=False,
            error_code=ErrorCode.DEADLINE_EXCEEDED,
            message=f"{why}, query its status",
            execution_id=event.execution_id,
            task_id=event.task_id,
            result=None,
            status_endpoint=contract.status_endpoint(event.execution_id),
            estimated_completion_ms=await self._estimate_stored(event, 0),  # (the caller's wait is ending)
        )

    async def _last_or_none(self, execution_id: str) -> Stored | None:
        """The execution's last event, or None if it cannot be read now (said in the log)."""
        try:
            return await self.store.last(execution_id)
        except StoreError as exc:
            log.info("%s: the log could not be read (%s)", execution_id, exc)
            return None

    async def _estimate(self, event: Requested) -> int:
        """Queue wait plus run time, from the function's recent executions and its queue now: the
        invocations ahead, shared among the attempts running, or the recent median wait if longer.
        Never 0: a function with no history is taken to run FALLBACK_RUN_MS."""
        at_hand = self._estimate_now(event)
        if at_hand is not None:
            return at_hand
        key = self.names.function_stats_key(event.task_id, event.function_name)
        now = time.monotonic()
        cached = self._estimates.get(key)
        if cached is None:
            run_ms, wait_ms = await self._stats_reads.read(key, lambda: self._read_estimate(key, now))
        else:
            _, run_ms, wait_ms = cached
        depth = await self.admission.depth(event.task_id)
        return _estimated_ms(run_ms, wait_ms, depth, self._parallel(event.task_id, depth))

    async def _estimate_stored(self, event: Requested, wait_s: float = ESTIMATE_WAIT_S) -> int:
        """`_estimate` for an invocation that is stored: figures that cannot be read now (a KV or
        consumer read timing out) must not turn its reply into an error, after which a caller
        retrying without an id would store it again (review20), nor hold it back for longer than
        `wait_s` (probe58: ASYNC replies 1.2 s late, DEADLINE_EXCEEDED 2 s after the caller's wait,
        while a consumer's leader was elected). Then FALLBACK_RUN_MS and the queue at hand."""
        try:
            async with asyncio.timeout(wait_s):  # (the reads go on, shared: the next caller's)
                return await self._estimate(event)
        except Exception as exc:
            log.info("%s: no estimate read (%s); the fallback is answered", event.execution_id, exc)
            depth = self.admission.depth_kept(event.task_id) or QueueDepth(0, 0, False)
            return _estimated_ms(FALLBACK_RUN_MS, 0, depth, self._parallel(event.task_id, depth))

    def _parallel(self, task_id: str, depth: QueueDepth) -> int:
        """How many of the task's invocations run at once: as admission has seen it lately, or as
        the workers serving it say they can (slots.py), whichever is more."""
        return max(self.admission.parallel(task_id, depth), self.slots.of(task_id))

    def _estimate_now(self, event: Requested) -> int | None:
        """`_estimate` from the figures at hand, without waiting (None: some must be read first)."""
        key = self.names.function_stats_key(event.task_id, event.function_name)
        cached = self._estimates.get(key)
        if cached is None:
            return None
        now = time.monotonic()
        if now - cached[0] >= ESTIMATE_CACHE_S:  # answered from the stale figures, read anew
            self._stats_reads.start(key, lambda: self._read_estimate(key, now))
        depth = self.admission.depth_at_hand(event.task_id)
        if depth is None:
            return None
        return _estimated_ms(cached[1], cached[2], depth, self._parallel(event.task_id, depth))

    async def _read_estimate(self, key: str, now: float) -> tuple[int, int]:
        """The function's median run and queue wait, read now (and kept: not recomputed per request)."""
        stats = await read_function_stats(self._state_bucket(), key)
        run_ms, wait_ms = stats.median_run_ms() or FALLBACK_RUN_MS, stats.median_wait_ms()
        self._estimates[key] = (now, run_ms, wait_ms)
        return run_ms, wait_ms

    async def observe_queues(self) -> None:
        """Every known task's queue as read within the last 0.5 s (read now, all at once, where
        older) and the projection's lag, for /metrics (a task without a worker consumer shows
        0). If JetStream does not answer, the gauges keep their values and `spear_jetstream_up`
        says 0 (probe54: a frozen NATS left every figure as it was, nothing said so)."""
        if not self.nc.is_connected:
            metrics.record_jetstream_up(False)
            return
        task_ids = list(self.tasks.tasks)
        reads = [self.admission.depth_within(task_id, QUEUE_GAUGE_AGE_S) for task_id in task_ids]
        serving = self.slots.workers_of(task_ids)  # (gathered at most every 10 s, in the background)
        if serving is not None:
            metrics.record_task_workers(serving)
        await asyncio.gather(*reads, return_exceptions=True)  # (a read that failed keeps its gauges)
        try:
            js = self.nc.jetstream()
            info = await js.consumer_info(self.names.stream, self.names.projection_consumer, timeout=1)
            metrics.record_projection_lag((info.num_pending or 0) + (info.num_ack_pending or 0))
        except NotFoundError:  # (no projection consumer yet: JetStream answered)
            metrics.record_jetstream_up(True)
        except (ApiError, nats.errors.Error):
            metrics.record_jetstream_up(False)
        else:
            metrics.record_jetstream_up(True)

    # --- CancelExecution -----------------------------------------------------------------------

    async def cancel(self, request: CancelExecutionRequest) -> CancelExecutionResponse:
        """Pending: cancelled at once, it never starts. Running: a `cancel_requested` event asks its
        worker to stop it (with `force`, `cancelled` is stored at once); the reply waits up to
        `worker.cancel_grace_ms` for the final status. Terminal: FAILED_PRECONDITION."""
        execution_id = contract.validate_id(request.execution_id, "execution_id")
        state = await self._live_state(execution_id, await self.projected_state(execution_id))
        known_seq = 0  # the stream's last sequence for the execution, as the last conflict told
        for _ in range(CANCEL_TRIES):
            if state is None:
                # as status says it: expired, or removed with its task, when a marker says so (probe20)
                message = await self._not_found_message(execution_id)
                return _cancel_reply(False, ExecutionStatus.UNKNOWN, message, ErrorCode.NOT_FOUND)
            if state.terminal:
                message = f"execution already ended {state.status}"
                return _cancel_reply(False, state.status, message, ErrorCode.FAILED_PRECONDITION)
            try:
                # Unreadable junk stored after the last readable event is ignored: append after it.
                return await self._cancel(state, max(state.last_seq, known_seq), request)
            except AppendConflict as conflict:
                # Events were stored meanwhile (a stream's chunks arrive every few ms): fold just
                # those in and try again, so a busy execution cannot starve its cancellation.
                known_seq = conflict.last_seq or 0
                state = await self._live_state(execution_id, state)
        raise ApiError(ErrorCode.INTERNAL, f"execution {execution_id} kept changing while being cancelled")

    async def _live_state(self, execution_id: str, state: ExecutionState | None) -> ExecutionState | None:
        """`state` (the projection's, or one read before) brought up to date with the log. While an
        attempt runs, only its own chunks and log lines can follow its `started` (each is fenced on
        the one before, so any other event ends them): if the last event is one of those, the state
        is unchanged but for the sequence, and one read suffices however long the stream is."""
        last = await self.store.last(execution_id)
        if (
            state is not None
            and last is not None
            and state.status == ExecutionStatus.RUNNING
            and last.event.kind in ("chunk", "log")
            and last.event.attempt == state.attempt
        ):
            return msgspec.structs.replace(state, last_seq=max(state.last_seq, last.seq))
        return fold(await self.store.history(execution_id, after_seq=state.last_seq if state else 0), state)

    async def _cancel(
        self, state: ExecutionState, last_seq: int, request: CancelExecutionRequest
    ) -> CancelExecutionResponse:
        """One try at cancelling a live execution whose last event is at `last_seq`."""
        # The events stay in the invocation's trace (their spans link to this request's).
        invocation = {"traceparent": await self.stream.invocation_traceparent(state.execution_id)}
        waiter = self.completions.expect(state.execution_id)
        try:
            await self.completions.following()
            if await store_cancel(self.store, state, last_seq, request.reason, request.force, invocation):
                return _cancel_reply(True, ExecutionStatus.CANCELLED, "execution cancelled")
            grace_s = self.settings.worker.cancel_grace_ms / 1000
            try:
                result = await asyncio.wait_for(asyncio.shield(waiter), grace_s)
            except TimeoutError:
                last = await self._last_or_none(state.execution_id)  # ended while no completions were followed?
                if last is None or not is_terminal(last.event):
                    message = "cancellation requested; the function has not stopped yet"
                    return _cancel_reply(True, ExecutionStatus.RUNNING, message)
                result = last.event.result
            return _cancel_reply(True, result.status, f"execution ended {result.status}")
        finally:
            self.completions.forget(state.execution_id, waiter)


def _cancel_reply(
    success: bool, final_status: ExecutionStatus, message: str, error_code: ErrorCode | None = None
) -> CancelExecutionResponse:
    return CancelExecutionResponse(
        success=success, message=message, final_status=final_status, error_code=error_code or ""
    )


MAX_PARAMETER_NAME = 256  # characters


def _parameters(request: InvokeFunctionRequest) -> dict[str, object]:
    """The call's parameters by name. A name is any non-empty string (probe50: `user-id` for a
    process artifact, whose parameters are one JSON object, was refused as no identifier): a
    Python function without `**kwargs` refuses names it does not take, as any unknown name."""
    parameters: dict[str, object] = {}
    for parameter in request.parameters:
        if not 0 < len(parameter.name) <= MAX_PARAMETER_NAME:
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT,
                f"parameter name {parameter.name[:40]!r} must be 1 to {MAX_PARAMETER_NAME} characters",
            )
        if parameter.name in parameters:
            raise ApiError(ErrorCode.INVALID_ARGUMENT, f"parameter {parameter.name!r} is given twice")
        parameters[parameter.name] = parameter.value
    return parameters


def _fingerprint(task_id: str, function_name: str, parameters: dict[str, object]) -> str:
    """What makes two requests the same: their JSON values, not how they were written (keys in any
    order; `1`, `1.0` and `1e0` are one number: probe50, a Go retry of a Python call was refused)."""
    return hashlib.sha256(canonical_json([task_id, function_name, parameters])).hexdigest()[:32]


def _estimated_ms(run_ms: int, wait_ms: int, depth: QueueDepth, parallel: int) -> int:
    """Run time plus queue wait: the invocations ahead shared among the `parallel` attempts the
    workers run at once, or the recent median wait if longer (never 0)."""
    ahead = max(0, depth.waiting - 1)  # this invocation is counted in the queue already
    queued_ms = ahead * run_ms / max(1, parallel)
    return max(1, int(run_ms + max(queued_ms, wait_ms)))


def _maybe_stored(event: Requested, exc: StoreUnavailable, surely_not: bool = True) -> InvokeFunctionResponse:
    """UNAVAILABLE for an invocation whose `requested` event JetStream did not confirm: it may
    have been stored all the same (the acknowledgement was lost, or came late) and then runs,
    unless nothing took it at all (StoreNotReached, where `surely_not`: its `requested` was the
    append that nothing took; probe58: a lost stream leader was said "may have been stored").
    The reply names the execution, so the caller can ask its status, or call again with this
    `execution_id`: a stored request under it is joined, never run a second time."""
    if surely_not and isinstance(exc, StoreNotReached):
        message = f"{exc}; the invocation was not stored: call again"
    else:
        message = (
            f"{exc}; the invocation may have been stored and run all the same: ask its status, or "
            "call again with this execution_id (a request stored under it is joined, never stored twice)"
        )
    return InvokeFunctionResponse(
        success=False,
        error_code=ErrorCode.UNAVAILABLE,
        message=message,
        execution_id=event.execution_id,
        task_id=event.task_id,
        result=None,
        status_endpoint=contract.status_endpoint(event.execution_id),
    )


def _finished(event: Requested, stored: StoredResult) -> InvokeFunctionResponse:
    result = api_result(stored)
    return InvokeFunctionResponse(
        success=True,
        message=contract.finished_message(result.status),
        execution_id=event.execution_id,
        task_id=event.task_id,
        result=result,
        instance_id=stored.instance_id,
    )
