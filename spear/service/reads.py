"""The read operations of spear (status, events, lists, tasks, health, stats), written once for
both adapters. The log is the truth: status is the projection's state topped up with the events
it has not applied yet, so a reply is never older than what the caller already saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from spear.core import contract
from spear.core.config import Settings, shown_urls
from spear.core.contract import (
    EVENTS_PAGE_MAX,
    ExecutionInfo,
    GetExecutionEventsRequest,
    GetExecutionEventsResponse,
    GetExecutionStatusRequest,
    GetExecutionStatusResponse,
    GetHealthRequest,
    GetHealthResponse,
    GetStatsRequest,
    GetStatsResponse,
    GetTaskRequest,
    GetTaskResponse,
    HealthDetails,
    ListExecutionsRequest,
    ListExecutionsResponse,
    ListTasksRequest,
    ListTasksResponse,
    ListWorkersRequest,
    ListWorkersResponse,
    ServiceStats,
    TaskInfo,
    TaskStats,
)
from spear.core.convert import execution_info, execution_result
from spear.core.enums import STATUSES, ApiError, ErrorCode, ExecutionStatus
from spear.core.events import EVENT_KINDS, Logged, encode_event, is_terminal
from spear.core.eventstore import EventStore, Stored
from spear.core.names import Names
from spear.core.redact import Redactor
from spear.core.state import ExecutionState, decode_state, fold
from spear.jetstream import counting, directget
from spear.jetstream.errors import UNREACHABLE
from spear.jetstream.store import JetStreamStore
from spear.projection.projection import POISON_RECENT_S, STALL_S, ProjectionStatus
from spear.projection.retention import TASK_CLEANUP, expired_marker
from spear.service import listing, views, workers
from spear.service.admission import Admission
from spear.service.diagnosis import unserved_tasks
from spear.service.fanout import SharedReaders, Shown, stored_only
from spear.service.registry import TaskDirectory
from spear.telemetry import metrics

FEED_REPLAY = 1000  # how far back the all-executions feed resumes (Last-Event-ID)
STALL_RECHECK_S = 0.5  # how long health watches an idle projection, events waiting, before calling it stalled
FEED_READ = 256  # events read per step of that feed
NATS_PING_S = 1  # health: how long (s) the server has to answer a ping
STORE_FULL_NOTED_S = 60.0  # health: how long a refusal for lack of room makes it degraded
COUNTS_AT_ONCE = 8  # tasks whose executions are counted at the same time (ListTasks with details)


PAGE_ENVELOPE_BYTES = 16 * 1024  # a page's reply around its events, and room to spare
PAGE_EVENT_OVERHEAD = 64  # `{"seq": …, "event": …}` and a comma, per event


class Reads:
    """Read operations; `Service` adds the writes. Expects the attributes `Service` sets up."""

    nc: Client
    settings: Settings
    names: Names
    store: EventStore
    stream: JetStreamStore  # stream-wide reads (the events feed)
    tasks: TaskDirectory
    admission: Admission
    state_kv: KeyValue | None
    started: float
    redactor: Redactor
    timeout: float
    tallies: views.TallyCache
    feeds: SharedReaders  # the live feeds' shared readers

    # --- GetExecutionStatus --------------------------------------------------------------------

    async def status(self, request: GetExecutionStatusRequest) -> GetExecutionStatusResponse:
        """The execution's state, result so far and (on request) its log lines; found=False if
        there is none (saying so if it expired)."""
        execution_id = contract.validate_id(request.execution_id, "execution_id")
        state = await self.execution_state(execution_id)
        metrics.record_status_query(found=state is not None)
        if state is None:
            return GetExecutionStatusResponse(
                found=False, message=await self._not_found_message(execution_id), error_code=ErrorCode.NOT_FOUND
            )
        logs: list[str] = []
        if request.include_logs:  # the `log` events: "<at> [attempt n] <message>", "… [progress 50%] …"
            history = await self.store.history(execution_id)
            logs = [_log_line(e) for e, _ in history if isinstance(e, Logged)]
        return GetExecutionStatusResponse(
            found=True,
            message="",
            # without the result data: its status, times and error stay where SPEAR has them
            result=execution_result(state)
            if request.include_result
            else msgspec.structs.replace(execution_result(state), result=None),
            logs=logs,
            execution=execution_info(state),
        )

    async def _not_found_message(self, execution_id: str) -> str:
        expired = await expired_marker(self._state_bucket(), self.names, execution_id)
        if expired is None:
            return f"no execution with id {execution_id!r}"
        ended = f"it ended {expired.status} at {expired.completed_at}"
        if expired.removed_by == TASK_CLEANUP:
            return (
                f"execution {execution_id!r} was removed at {expired.expired_at} with its task's history "
                f"(delete_task with cleanup_executions): {ended}"
            )
        if not expired.retention_hours:  # a marker written before it carried its retention
            # (this process's setting may not be the one that expired it: no number is claimed)
            return f"execution {execution_id!r} expired at {expired.expired_at}: {ended}, and the retention removed it"
        return (
            f"execution {execution_id!r} expired at {expired.expired_at}: {ended}, "
            f"and ended executions were kept {expired.retention_hours:g} hours when it expired"
        )

    async def execution_state(self, execution_id: str) -> ExecutionState | None:
        """The projection's state, topped up with events it has not applied yet. A terminal state
        is final; otherwise one direct get of the execution's last event says whether the
        projection is behind, and only then is the rest of its history read."""
        state = await self.projected_state(execution_id)
        if state is not None:
            if state.terminal:
                return state
            last = await self.store.last(execution_id)
            if last is None or last.seq <= state.last_seq:
                return state
        newer = await self.store.history(execution_id, after_seq=state.last_seq if state else 0)
        return fold(newer, state)

    async def projected_state(self, execution_id: str) -> ExecutionState | None:
        """The projection's state of an execution (it may lag behind the log)."""
        self._state_bucket()  # UNAVAILABLE before the service has started
        value = await directget.kv_value(
            self.nc, self.names.state_bucket, self.names.state_key(execution_id), self.timeout
        )
        return decode_state(value) if value else None

    # --- events ----------------------------------------------------------------------------------

    async def events(self, execution_id: str) -> list[Stored]:
        """The execution's stored events in order, secrets redacted; NOT_FOUND if it has none."""
        contract.validate_id(execution_id, "execution_id")
        history = await self._shown_history(execution_id)
        if not history:
            raise ApiError(ErrorCode.NOT_FOUND, f"no execution with id {execution_id!r}")
        return history

    async def check_exists(self, execution_id: str, after_seq: int = 0) -> None:
        """NOT_FOUND unless the execution has an event stored: one read, however long its history
        (review29: a late SSE client read all of it first, only to know it exists).
        INVALID_ARGUMENT if `after_seq`, where a reader resumes, is past the last event of an
        execution still going: no reader saw that one (probe55: such a reader waited for ever, the
        events to come all under it). Past the end of one that ended, there is nothing to wait for."""
        contract.validate_id(execution_id, "execution_id")
        last = await self.store.last(execution_id)
        if last is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no execution with id {execution_id!r}")
        if after_seq > last.seq and not is_terminal(last.event):
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT,
                f"Last-Event-ID {after_seq} is past execution {execution_id!r}'s last event ({last.seq})",
            )

    async def _shown_history(self, execution_id: str, after_seq: int = 0) -> list[Stored]:
        """The execution's stored events after `after_seq` as a reader may see them (both the
        HTTP events route and GetExecutionEvents read through here)."""
        return [self._shown(stored) for stored in await self.store.history(execution_id, after_seq=after_seq)]

    async def execution_events(self, request: GetExecutionEventsRequest) -> GetExecutionEventsResponse:
        """A page of the execution's stored events after `after_seq`, secrets redacted: how a
        client without direct-get permission on the stream follows an execution (docs/design.md)."""
        execution_id = contract.validate_id(request.execution_id, "execution_id")
        # one read of about a page's bytes, not the rest of the history (probe32: a late reader of a
        # long stream read all of it again for every page)
        page, more = await self.store.history_page(execution_id, request.after_seq, self.page_bytes())
        history = [self._shown(stored) for stored in page]
        if not history and (request.after_seq == 0 or await self.store.last(execution_id) is None):
            return GetExecutionEventsResponse(
                found=False, message=await self._not_found_message(execution_id), error_code=ErrorCode.NOT_FOUND
            )
        limit = request.limit or EVENTS_PAGE_MAX
        # A page is also bounded in bytes, so that its reply fits in one NATS message: two events
        # near the size limit (a large chunk, then the list of chunks as the result) fit only apart.
        # One event always fits (results and chunks are kept under max_payload less the envelope).
        budget, events = self.page_bytes(), list[contract.StoredEvent]()
        for stored in history[:limit]:
            data = encode_event(stored.event)
            budget -= len(data) + PAGE_EVENT_OVERHEAD
            if events and budget < 0:
                break
            events.append(contract.StoredEvent(stored.seq, msgspec.Raw(data)))
        return GetExecutionEventsResponse(found=True, events=events, has_more=more or len(history) > len(events))

    def page_bytes(self) -> int:
        """How many bytes of events one page of GetExecutionEvents may carry."""
        return self.nc.max_payload - PAGE_ENVELOPE_BYTES

    def _shown(self, stored: Stored) -> Stored:
        """An event as a reader may see it: sensitive context values redacted (docs/design.md)."""
        return Stored(self.redactor.event(stored.event), stored.seq)

    async def follow(
        self, execution_id: str, after_seq: int = 0, idle_s: float = 15.0
    ) -> AsyncIterator[list[Shown] | None]:
        """Stored events after `after_seq`, then live ones as they are stored, until the terminal
        event, in batches. Yields None after `idle_s` without an event (for keep-alives). Live,
        the clients of an execution share one reader of it (`spear.service.fanout`)."""

        last = await self.store.last(execution_id)
        if last is not None and is_terminal(last.event) and last.seq <= after_seq:
            return  # resumed after its end: nothing more will come

        async def stored_after(seq: int) -> list[Stored]:  # (a page at a time: the caller reads on)
            return (await self.store.history_page(execution_id, after_seq=seq))[0]

        if last is not None and is_terminal(last.event):  # ended: its history only, no shared reader
            async for batch in stored_only(stored_after, self._shown_once, after_seq):
                yield batch
            return
        subject = self.names.execution_events(execution_id)
        live_from = last.seq if last is not None else after_seq
        feed = self.feeds.follow(subject, stored_after, self._shown_once, live_from, after_seq, idle_s, None, True)
        async with contextlib.aclosing(feed):  # (closed with this one: it leaves its shared reader)
            async for live in feed:
                yield live

    async def follow_all(
        self, task_id: str = "", kinds: frozenset[str] = frozenset(), after_seq: int | None = None, idle_s: float = 15.0
    ) -> AsyncIterator[list[Shown] | None]:
        """Every execution's events (or one task's) as they are stored, from now on or after
        `after_seq` (at most FEED_REPLAY events back), optionally only some kinds; never ends.
        The feeds of a process share one reader of each subject (`spear.service.fanout`, probe57:
        each feed read every event back for itself). Over NATS the same feed is a subscription on
        `P.exec.>`."""
        if task_id:
            contract.validate_id(task_id, "task_id")
        unknown = kinds - EVENT_KINDS
        if unknown:
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT,
                f"unknown event kind {sorted(unknown)[0]!r}; kinds are {', '.join(sorted(EVENT_KINDS))}",
            )
        now = await self.stream.last_seq()
        start = now if after_seq is None else max(min(after_seq, now), now - FEED_REPLAY)
        subject = self.names.event(task_id or "*", "*", "*")

        async def stored_after(seq: int) -> list[Stored]:
            return await self.stream.stored(subject, seq, FEED_READ)

        wanted = (lambda shown: shown.event.kind in kinds) if kinds else None
        feed = self.feeds.follow(subject, stored_after, self._shown_once, now, start, idle_s, wanted)
        async with contextlib.aclosing(feed):  # (closed with this one: it leaves its shared reader)
            async for batch in feed:
                yield batch

    def _shown_once(self, stored: Stored) -> Shown:
        """`_shown`, encoded: what a live feed sends (once for all its clients)."""
        return Shown.of(stored.seq, self.redactor.event(stored.event))

    # --- ListExecutions, tasks, health, stats --------------------------------------------------

    async def list_executions(self, request: ListExecutionsRequest) -> ListExecutionsResponse:
        """Executions in id (creation) order, by task and status, a page at a time."""
        status = ExecutionStatus.parse_input(request.status_filter, "status", None, STATUSES)
        return await listing.list_page(self.nc, self.names, request, status, self.timeout)

    async def list_workers(self, request: ListWorkersRequest | None = None) -> ListWorkersResponse:
        """The running workers (of one task, if asked), with the executions each one runs."""
        request = request or ListWorkersRequest()
        replies, serving_now = await asyncio.gather(
            workers.gather(self.nc, f"$SRV.INFO.{self.names.worker_service_name}"),
            workers.now_serving(self.nc, self.names.worker_tasks),
        )
        infos = workers.service_infos(replies)
        running_by_state: dict[str, list[str]] = {}
        if workers.unsaid_running(infos, serving_now):  # a scan, while older workers run
            for state in await self._states(lambda s: s.status == ExecutionStatus.RUNNING and bool(s.worker_id)):
                running_by_state.setdefault(state.worker_id, []).append(state.execution_id)
        return workers.workers(infos, request, serving_now, running_by_state)

    async def get_task(self, request: GetTaskRequest) -> GetTaskResponse:
        """A registered task, with its newest executions on request."""
        task_id = contract.validate_id(request.task_id, "task_id")
        task = self.tasks.get(task_id)
        if task is None:
            return GetTaskResponse(
                found=False, message=f"task {task_id!r} is not registered", error_code=ErrorCode.NOT_FOUND
            )
        executions: list[ExecutionInfo] = []
        if request.include_executions and request.execution_limit:
            newest = ListExecutionsRequest(task_id=task_id, limit=request.execution_limit)
            executions = (await listing.list_page(self.nc, self.names, newest, None, self.timeout)).executions
        serving = await workers.serving(self.nc, self.names.worker_tasks, task_id)
        counted = await self._with_counts(task)
        task = msgspec.structs.replace(counted, workers=serving.workers, instances=serving.instances)
        return GetTaskResponse(found=True, task=task, executions=executions)

    async def list_tasks(self, request: ListTasksRequest) -> ListTasksResponse:
        """Registered tasks in id order, by prefix, a page at a time."""
        chosen = [
            task
            for task_id, task in sorted(self.tasks.tasks.items())
            if task_id.startswith(request.prefix) and task_id > request.start_after
        ]
        page = chosen[: request.limit]
        if request.include_details:  # with the workers serving each now, as get_task (probe54: none)
            page, now = await asyncio.gather(
                self._all_with_counts(page), workers.now_serving(self.nc, self.names.worker_tasks)
            )
            page = [
                msgspec.structs.replace(t, workers=sorted(w for w, a in now.items() if t.task_id in a.tasks))
                for t in page
            ]
        has_more = len(chosen) > len(page)
        return ListTasksResponse(tasks=page, has_more=has_more, next_start_after=page[-1].task_id if has_more else "")

    async def _with_counts(self, task: TaskInfo) -> TaskInfo:
        """`task` with how many executions it has and the status of its newest, from the
        stream's `requested` events (one per execution): counted by the server and one read of
        the newest, not a scan of every state (1,000,000 executions kept: ~30 s a scan). Three
        reads, not one snapshot: an execution accepted meanwhile may be counted and not be the
        one whose status is given."""
        requested = self.names.event(task.task_id, "*", "requested")
        count, newest = await asyncio.gather(
            counting.count_matching(self.nc, self.names.stream, requested, self.timeout),
            directget.newest(self.nc, self.names.stream, requested, self.timeout),
        )
        status = ExecutionStatus.UNKNOWN.value
        if newest is not None:
            state = await self.execution_state(self.names.event_execution_id(newest.subject))
            status = state.status if state is not None else status
        return msgspec.structs.replace(task, execution_count=count, last_status=status)

    async def _all_with_counts(self, tasks: list[TaskInfo]) -> list[TaskInfo]:
        """Each of `tasks` with its counts, COUNTS_AT_ONCE tasks at a time."""
        limit = asyncio.Semaphore(COUNTS_AT_ONCE)

        async def counted(task: TaskInfo) -> TaskInfo:
            async with limit:
                return await self._with_counts(task)

        return list(await asyncio.gather(*(counted(task) for task in tasks)))

    async def health(self, request: GetHealthRequest | None = None) -> GetHealthResponse:
        """healthy: a projection and a worker answer; degraded: something that runs or records
        invocations is missing (a task's invocations wait with no worker serving it, say), the
        reasons in `message`; unhealthy: no NATS. `components` says too whether a NATS gateway
        answers, and `message` notes it when none does (a `spear api` of its own serves HTTP
        while NATS clients get UNAVAILABLE): a deployment may serve HTTP alone (review43)."""
        request = request or GetHealthRequest()
        nats_answers = await self._nats_answers()
        projection = await self._projection_status() if nats_answers else None
        gateway, worker = (
            await asyncio.gather(self._answers(self.names.service_name), self._answers(self.names.worker_service_name))
            if nats_answers
            else (False, False)
        )
        components = {"nats": nats_answers, "projection": projection is not None, "worker": worker}
        problems = await self._projection_problems(projection) if projection is not None else []
        if self.store.full_at is not None and time.monotonic() - self.store.full_at < STORE_FULL_NOTED_S:
            ago = time.monotonic() - self.store.full_at
            problems.append(f"JetStream refused to store an event {ago:.0f} s ago: its storage is full")
        if components["nats"]:
            problems += await unserved_tasks(self.nc, self.names, self.admission, self.tasks.tasks, self.timeout)
        if all(components.values()) and not problems:
            status, message = "healthy", "serving"
        elif components["nats"]:
            missing = " or ".join(
                name for name, up in components.items() if not up
            )  # "no projection or worker answers"
            status, message = "degraded", "; ".join(([f"no {missing} answers"] if missing else []) + problems)
        else:
            why = "reconnecting" if not self.nc.is_connected else f"connected, but no answer within {NATS_PING_S} s"
            status, message = "unhealthy", f"NATS unreachable ({shown_urls(self.settings.nats.urls)}): {why}"
        if nats_answers and not gateway:
            message += "; no NATS gateway answers (NATS clients cannot call; HTTP serves)"
        components["gateway"] = gateway
        error_code = ErrorCode.UNAVAILABLE if status == "unhealthy" else ""
        if projection is not None:  # the counts since the projection started, whatever the status
            message += _poison_note(projection)
        details = None
        if request.include_details and components["nats"]:
            stats = (await self._tally()).execution_stats()
            details = HealthDetails(
                active_tasks=len(self.tasks.tasks),
                running_executions=stats.running_executions,
                pending_executions=stats.pending_executions,
                total_memory_used=_memory_used(),
                total_executions=sum(stats.executions_by_function.values()),
                system_info={"python": platform.python_version(), "platform": platform.platform()},
            )
        return GetHealthResponse(
            status=status,
            message=message,
            error_code=error_code,
            uptime_seconds=self._uptime(),
            details=details,
            components=components,
        )

    async def stats(self, request: GetStatsRequest | None = None) -> GetStatsResponse:
        """Service, task and execution statistics, over the last `time_range_hours` (0: all)."""
        request = request or GetStatsRequest()
        counted = await self._tally(request.time_range_hours)
        busy = counted.busy
        tasks = [counted.with_counts(task) for task in self.tasks.tasks.values()]
        most_active = sorted(tasks, key=lambda t: -t.execution_count)[:5]
        if request.include_task_stats and most_active:  # with the workers serving each now, as get_task
            now = await workers.now_serving(self.nc, self.names.worker_tasks)
            most_active = [
                msgspec.structs.replace(t, workers=sorted(w for w, a in now.items() if t.task_id in a.tasks))
                for t in most_active
            ]
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        return GetStatsResponse(
            service_stats=ServiceStats(
                uptime_seconds=self._uptime(),
                total_tasks=len(self.tasks.tasks),
                total_executions=counted.total,
                total_memory_used=_memory_used(),
                cpu_usage_percent=round(
                    100.0 * (cpu.ru_utime + cpu.ru_stime) / max(1.0, time.monotonic() - self.started), 2
                ),
                memory_usage_percent=_memory_percent(),
            ),
            task_stats=TaskStats(
                active_tasks=len(busy & set(self.tasks.tasks)),
                idle_tasks=len(set(self.tasks.tasks) - busy),
                tasks_by_type=dict(Counter((t.artifact_spec or {}).get("artifact_type", "unknown") for t in tasks)),
                most_active_tasks=most_active,
            )
            if request.include_task_stats
            else None,
            execution_stats=counted.execution_stats() if request.include_execution_stats else None,
        )

    async def _states(self, keep: Callable[[ExecutionState], bool] = lambda _: True) -> list[ExecutionState]:
        return await views.scan_states(self.nc, self.names.state_bucket, self.timeout, keep)

    async def _tally(self, hours: int = 0) -> views.Tally:
        return await self.tallies.get(hours)

    async def _scan_tally(self, hours: int) -> views.Tally:
        return await views.tally(self.nc, self.names.state_bucket, self.timeout, hours)

    async def _keep_tally(self, hours: int, took: float, tally: views.Tally) -> None:
        value = views.encode_kept(tally, took, scanned_at=time.time())
        await self._state_bucket().put(self.names.tally_key(hours), value)

    async def _recall_tally(self, hours: int) -> tuple[float, float, views.Tally] | None:
        """(age in seconds, took, tally) of the answer a slow scan left in the state bucket."""
        value = await directget.kv_value(self.nc, self.names.state_bucket, self.names.tally_key(hours), self.timeout)
        kept = views.decode_kept(value) if value else None
        if kept is None:
            return None
        scanned_at, took, tally = kept
        return time.time() - scanned_at, took, tally

    def _state_bucket(self) -> KeyValue:
        if self.state_kv is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "the service has not started")
        return self.state_kv

    def _uptime(self) -> int:
        return int(time.monotonic() - self.started)

    async def _projection_status(self) -> ProjectionStatus | None:
        try:
            reply = await self.nc.request(self.names.projection_status, b"", timeout=0.5)
            return msgspec.json.decode(reply.data, type=ProjectionStatus)
        except UNREACHABLE:
            return None
        except msgspec.DecodeError:
            return None

    async def _projection_problems(self, projection: ProjectionStatus) -> list[str]:
        """A projection that stalls or keeps failing makes health `degraded`, with the reason."""
        problems = []
        try:
            info = await self.nc.jetstream().consumer_info(
                self.names.stream, self.names.projection_consumer, timeout=0.5
            )
            lag = info.num_pending + info.num_ack_pending
        except UNREACHABLE:
            lag = projection.waiting
        except nats.js.errors.ServiceUnavailableError:  # temporarily unavailable (electing): not known now
            lag = projection.waiting
        except NotFoundError:
            lag = projection.waiting
        if projection.stalled or (lag > 0 and projection.idle_s > STALL_S and await self._still_idle(projection)):
            problems.append(f"projection stalled: {lag} events behind, none applied for {projection.idle_s:.0f} s")
        if not projection.running:
            problems.append("projection loop is not running")
        if projection.restarts and projection.idle_s > STALL_S:
            problems.append(f"projection restarted {projection.restarts} times; last error: {projection.last_error}")
        age = projection.last_poison_age_s
        if age is not None and age < POISON_RECENT_S:
            problems.append(f"poison invocation ended {age:.0f} s ago (POISON_MESSAGE): {projection.last_poison}")
        return problems

    async def _still_idle(self, projection: ProjectionStatus) -> bool:
        """Whether a projection idle for a while and with events waiting applies none of them
        within STALL_RECHECK_S: events that have just come after a quiet spell are not a stall
        (a probe: 30 invocations, then health at once, said "stalled ... none applied for 12 s")."""
        await asyncio.sleep(STALL_RECHECK_S)
        again = await self._projection_status()
        return again is None or again.applied_seq == projection.applied_seq

    async def _nats_answers(self) -> bool:
        """Whether the server answers a ping now: a connection can stay open to a server that
        answers nothing (stopped, or swamped), which only the client's own pings notice, minutes
        later (review14: health said `nats: true` while every call was UNAVAILABLE)."""
        if not self.nc.is_connected:
            return False
        try:
            await self.nc.flush(timeout=NATS_PING_S)
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    async def _answers(self, service_name: str) -> bool:
        try:
            await self.nc.request(f"$SRV.PING.{service_name}", b"", timeout=0.5)
            return True
        except UNREACHABLE:
            return False


def _poison_note(projection: ProjectionStatus) -> str:
    notes = []
    if projection.poison_invocations:
        notes.append(f"{projection.poison_invocations} poison invocations (last: {projection.last_poison})")
    if projection.skipped_events:
        notes.append(f"{projection.skipped_events} unreadable events skipped (last: {projection.last_skipped})")
    return "".join(f"; {note}" for note in notes)


def _memory_used() -> int:
    """This process's resident memory now (the peak is reset by in-process workers' measuring)."""
    return metrics.process_rss_bytes()


def _memory_percent() -> float:
    """This process's resident memory as a share of the machine's (0.0 where it cannot be read)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0.0
    return round(100.0 * _memory_used() / total, 3) if total > 0 else 0.0


def _log_line(event: Logged) -> str:
    """A `log` event as a line of a status's logs; a progress report says so (probe56: a step
    logged and reported read as the same line twice)."""
    if event.progress is None:
        return f"{event.at} [attempt {event.attempt}] {event.message}"
    return f"{event.at} [attempt {event.attempt}] [progress {event.progress:.0%}] {event.message}".rstrip()
