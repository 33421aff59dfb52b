"""The Python client SDK: invoke functions, follow executions and read spear's state over NATS,
as the wire contract (docs/contract.md) describes it.

    async with spear.Client("nats://127.0.0.1:4222") as client:
        print(await client.invoke("demo", "calculate_fibonacci", n=30))

Errors are typed (`spear.errors`): a request that fails raises the error of its code
(`NotFound`, `InvalidArgument`, `Unavailable`, ...); an execution that ends other than COMPLETED
raises `FunctionFailed`, `Timeout` or `Cancelled` with the remote error and the execution id.
Waiting is done by subscription to the execution's stored events, never by polling. `SyncClient`
(in spear.sync_client) wraps it for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, cast

import msgspec
import nats.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from spear import errors
from spear.aio import poll_until
from spear.core.enums import TERMINAL_STATUSES
from spear.core.events import TERMINAL_KINDS, AnyEvent
from spear.core.eventstore import Stored
from spear.core.names import Names
from spear.jetstream.connection import is_refusal
from spear.service.callerwait import WAIT_HEADER
from spear.service.follow import follow_stored

# A gateway restarting (or not up yet) answers "no responders": asked again for this long.
NO_RESPONDERS_RETRY_S = 1.0


@dataclass(frozen=True)
class Execution:
    """An execution's status as GetExecutionStatus reports it. `status` is the contract's full
    name (`EXECUTION_STATUS_COMPLETED`); `state` its short form (`completed`)."""

    id: str
    task_id: str
    function_name: str
    status: str
    result: Any = None
    error_code: str = ""
    error_message: str = ""
    execution_time_ms: int = 0
    attempt: int = 0
    requested_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    progress: float | None = None
    progress_message: str = ""
    logs: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> str:
        """The status as a short word: `pending`, `running`, `completed`, ..."""
        return self.status.removeprefix("EXECUTION_STATUS_").lower()

    @property
    def done(self) -> bool:
        """Whether the execution has ended."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> Execution:
        """An Execution from a GetExecutionStatus reply."""
        info = reply.get("execution") or {}
        result = reply.get("result") or {}
        metrics = result.get("metrics") or {}
        return cls(
            id=info.get("execution_id", ""),
            task_id=info.get("task_id", ""),
            function_name=info.get("function_name", ""),
            status=result.get("status") or info.get("status", ""),
            result=result.get("result"),
            error_code=result.get("error_code", ""),
            error_message=result.get("error_message") or info.get("error_message", ""),
            execution_time_ms=result.get("execution_time_ms") or info.get("execution_time_ms", 0),
            attempt=result.get("attempt") or info.get("attempt", 0),
            requested_at=info.get("requested_at"),
            started_at=result.get("started_at") or info.get("started_at"),
            completed_at=result.get("completed_at") or info.get("completed_at"),
            progress=metrics.get("progress"),
            progress_message=metrics.get("progress_message", ""),
            logs=list(reply.get("logs") or []),
            raw=dict(reply),
        )


@dataclass(frozen=True)
class Event:
    """One stored event of an execution (CONTRACT §4): `type` is its kind, `seq` its stream
    sequence, `data` the whole event object as stored."""

    seq: int
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """Whether the event ends its execution."""
        return self.type in TERMINAL_KINDS

    @property
    def attempt(self) -> int:
        """The attempt the event belongs to."""
        return int(self.data.get("attempt", 0))

    @property
    def at(self) -> str:
        """When the event happened (RFC 3339)."""
        return str(self.data.get("at", ""))

    @property
    def progress(self) -> float | None:
        """The progress a `log` event reports, if any."""
        value = self.data.get("progress")
        return float(value) if isinstance(value, int | float) else None

    @property
    def message(self) -> str:
        """The message of a `log` event."""
        return str(self.data.get("message", ""))

    @property
    def result(self) -> dict[str, Any]:
        """The ExecutionResult a terminal (or retrying) event carries; {} for others."""
        return dict(self.data.get("result") or {})


class Chunk(NamedTuple):
    """One item a STREAM function yielded: `seq` counts from 0, `data` is its JSON value."""

    seq: int
    data: Any
    attempt: int


class ExecutionHandle:
    """An accepted execution: `id`, and ways to look at it, wait for it, follow it, cancel it."""

    def __init__(self, client: Client, execution_id: str, reply: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = execution_id
        self.reply = reply or {}  # the InvokeFunctionResponse that accepted it
        self.stream_subject: str = self.reply.get("stream_subject") or client.execution_subject(execution_id)

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.id!r})"

    async def status(self, include_logs: bool = False) -> Execution:
        """The execution's current status."""
        return await self.client.status(self.id, include_logs=include_logs)

    async def cancel(self, reason: str = "", force: bool = False) -> str:
        """Cancel the execution; its status after the request."""
        return await self.client.cancel(self.id, reason=reason, force=force)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the execution to end; return its result, or raise `FunctionFailed`, `Timeout`
        or `Cancelled`. `timeout` (seconds) bounds the wait: `DeadlineExceeded` when it ends first
        (the execution goes on). Waits by subscription: subscribe to the execution's events first,
        then read its status once, so an end stored in between is not missed."""
        terminal = await self.wait(timeout)
        return _outcome(self.id, terminal)

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the execution to end and return its ExecutionResult (whatever the status).
        A live terminal message only wakes the wait up: the result is read back through the
        gateway (GetExecutionStatus), as anyone allowed to publish could imitate the message, and
        a least-privilege client may not read the stream itself (docs/design.md)."""
        wake = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            if msg.subject.rsplit(".", 1)[-1] in TERMINAL_KINDS:
                wake.set()

        sub = await self.client.nc.subscribe(self.stream_subject, cb=on_event)
        try:
            execution = await self.status()  # after subscribing: an end stored meanwhile is in it
            if execution.done:
                return dict(execution.raw.get("result") or {})
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a Ctrl-C that comes
                # as the end arrives (see spear.service.follow)
                async with asyncio.timeout(timeout):
                    while True:
                        await wake.wait()
                        wake.clear()
                        execution = await self.status()
                        if execution.done:
                            return dict(execution.raw.get("result") or {})
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"execution {self.id} had not ended after {timeout:g} s", execution_id=self.id
                ) from None
        finally:
            await sub.unsubscribe()

    async def events(self, after_seq: int = 0, idle_s: float = 15.0) -> AsyncGenerator[Event, None]:
        """The execution's stored events in order, then each new one as it is stored, until the
        terminal event. Each event comes once, read back through the gateway
        (`P.api.get_execution_events`: redacted, and allowed to a least-privilege client); live
        messages only wake the reader up (spear.service.follow)."""

        async def stored_after(seq: int) -> list[Stored]:
            return await self.client.stored_events(self.id, seq)

        stored_events = cast(
            AsyncGenerator[Stored | None, None],
            follow_stored(self.client.nc, self.stream_subject, stored_after, after_seq, idle_s, True),
        )
        async with aclosing(stored_events):
            async for stored in stored_events:
                if stored is not None:
                    yield Event(stored.seq, stored.event.kind, msgspec.to_builtins(stored.event))

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """The items a STREAM function yields, as they are stored (a late reader replays what it
        missed), then returns when the execution completes; raises its error if it did not. When
        an attempt is retried, the new attempt's chunks are yielded from the first `seq` not yet
        seen, so a reader sees each `seq` once."""
        next_seq = 0
        async for event in self.events():
            if event.type == "chunk":
                seq = int(event.data.get("seq", 0))
                if seq >= next_seq:
                    next_seq = seq + 1
                    yield Chunk(seq, event.data.get("data"), event.attempt)
            elif event.terminal:
                _outcome(self.id, event.result)


class Client:
    """An async spear client over NATS.

    `servers`: one NATS URL, a comma-separated list, or a list (a cluster); by default
    `$SPEAR_NATS_URL`, else nats://127.0.0.1:4222. `prefix`: the subject prefix spear runs under
    (default `$SPEAR_SUBJECT_PREFIX`, else `spear`). Credentials: `user` + `password`, `token`,
    or `creds_file`; `tls`: an SSLContext (a `tls://` URL alone uses nats-py's default one).
    `connect_timeout` bounds the first connection (seconds): an unreachable NATS raises
    `Unavailable` then; once connected, the client reconnects on its own. `request_timeout`
    bounds each request other than a SYNC invocation.
    """

    def __init__(
        self,
        servers: str | Iterable[str] | None = None,
        *,
        prefix: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 2.0,
        request_timeout: float = 10.0,
        name: str = "spear-client",
        nc: Nats | None = None,
    ) -> None:
        if servers is None:
            servers = os.environ.get("SPEAR_NATS_URL") or "nats://127.0.0.1:4222"
        if isinstance(servers, str):
            servers = servers.split(",")
        self.servers = [url.strip() for url in servers if url.strip()]
        self.prefix = prefix or os.environ.get("SPEAR_SUBJECT_PREFIX") or "spear"
        self.names = Names(self.prefix)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.name = name
        self._credentials: dict[str, Any] = {}
        if user:
            self._credentials.update(user=user, password=password)
        if token:
            self._credentials.update(token=token)
        if creds_file:
            self._credentials.update(user_credentials=creds_file)
        if tls is not None:  # TLS / mTLS to NATS (a tls:// URL alone uses the system's CAs)
            self._credentials.update(tls=tls)
        self._nc = nc
        self._owns_connection = nc is None

    # --- connection ------------------------------------------------------------------------------

    @property
    def nc(self) -> Nats:
        """The NATS connection; Unavailable if the client is not connected."""
        if self._nc is None or self._nc.is_closed:
            raise errors.Unavailable("the client is not connected: use `async with Client(...)` or `await connect()`")
        return self._nc

    @property
    def stream_name(self) -> str:
        """The executions stream of the prefix."""
        return self.names.stream

    def execution_subject(self, execution_id: str) -> str:
        """The subjects of one execution's stored events."""
        return self.names.execution_events(execution_id)

    async def connect(self) -> Client:
        """Connect within `connect_timeout` or raise `Unavailable` naming the servers and why."""
        if self._nc is not None and self._nc.is_connected:
            return self
        nc = Nats()
        failures: list[BaseException] = []
        # Credentials refused, or every server refused twice: waiting would not help a command line.
        hopeless = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            failures.append(exc)  # told in the Unavailable message (nats-py would log a traceback)
            refused = is_refusal(exc) and not nc.is_connected
            # A reset may hide a refusal (the server closed before its -ERR was read): try again.
            tries = sum(not isinstance(failure, ConnectionResetError) for failure in failures)
            if (refused or tries >= 2 * len(self.servers)) and not hopeless.done():
                hopeless.set_result(None)

        options: dict[str, Any] = dict(
            self._credentials,
            servers=self.servers,
            name=self.name,
            connect_timeout=max(0.2, min(1.0, self.connect_timeout / 2)),
            reconnect_time_wait=0.2,
            max_reconnect_attempts=-1,
            error_cb=on_error,
        )
        connecting = asyncio.ensure_future(nc.connect(**options))
        try:
            await asyncio.wait(
                {connecting, hopeless}, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not connecting.done():
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
        failure = connecting.exception() if connecting.done() and not connecting.cancelled() else None
        if not connecting.done() or connecting.cancelled() or failure is not None:
            with contextlib.suppress(Exception):
                await nc.close()
            why = failures[-1] if failures else failure or TimeoutError()
            urls = ",".join(self.servers)
            refusal = next((exc for exc in failures if is_refusal(exc)), None)
            if refusal is not None:
                raise errors.Unauthenticated(f"NATS at {urls} refused the credentials or TLS: {_describe(refusal)}")
            raise errors.Unavailable(f"cannot reach NATS at {urls}: {_describe(why)}")
        self._nc = nc
        return self

    async def close(self) -> None:
        """Close the connection (one the client was given stays open)."""
        if self._nc is not None and self._owns_connection and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- invoking --------------------------------------------------------------------------------

    async def invoke(
        self,
        task_id: str,
        function_name: str,
        /,
        *,
        params: Mapping[str, Any] | None = None,
        execution_id: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        wait: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a function and return its result (SYNC). Parameters are keyword arguments, or
        `params` for names that clash with these options. `timeout` is the execution's time
        limit in seconds (default: the server's); `execution_id` an idempotency key; `wait` how
        long to wait for the reply (default: the time limit × attempts + 10 s, or 120 s)."""
        request = invoke_request(
            task_id, function_name, "SYNC", {**(params or {}), **kwargs}, execution_id, timeout, max_retries
        )
        wait_s = wait or sync_wait(timeout, max_retries)
        # Saying how long we wait lets the gateway end its wait (and free its SYNC slot) in time.
        reply = await self.request("invoke_function", request, wait_s, headers={WAIT_HEADER: str(int(wait_s * 1000))})
        return _outcome(reply.get("execution_id", ""), reply.get("result") or {})

    async def submit(
        self,
        task_id: str,
        function_name: str,
        /,
        *,
        params: Mapping[str, Any] | None = None,
        execution_id: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        mode: str = "ASYNC",
        **kwargs: Any,
    ) -> ExecutionHandle:
        """Start a function (ASYNC, or `mode="STREAM"`) and return a handle to it as soon as the
        invocation is stored."""
        request = invoke_request(
            task_id, function_name, mode, {**(params or {}), **kwargs}, execution_id, timeout, max_retries
        )
        reply = await self.request("invoke_function", request)
        return ExecutionHandle(self, reply["execution_id"], reply)

    async def stream(
        self,
        task_id: str,
        function_name: str,
        /,
        *,
        params: Mapping[str, Any] | None = None,
        execution_id: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        """Run a STREAM function and yield each item it yields, as it comes; raises the
        execution's error if it does not complete."""
        handle = await self.submit(
            task_id,
            function_name,
            params=params,
            execution_id=execution_id,
            timeout=timeout,
            mode="STREAM",
            **kwargs,
        )
        chunks = handle.chunks()
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk.data

    def execution(self, execution_id: str) -> ExecutionHandle:
        """A handle to an execution by id (started elsewhere, say)."""
        return ExecutionHandle(self, execution_id)

    # --- reading and cancelling ------------------------------------------------------------------

    async def status(self, execution_id: str, include_logs: bool = False) -> Execution:
        """An execution's status (with its log lines if asked)."""
        reply = await self.request("get_execution_status", {"execution_id": execution_id, "include_logs": include_logs})
        return Execution.from_reply(reply)

    async def cancel(self, execution_id: str, reason: str = "", force: bool = False) -> str:
        """Cancel an execution; returns its status after the request (`EXECUTION_STATUS_CANCELLED`,
        or `EXECUTION_STATUS_RUNNING` while a running function has not stopped yet). An execution
        that had already ended raises `FailedPrecondition` (with its `final_status`)."""
        reply = await self.request("cancel_execution", {"execution_id": execution_id, "reason": reason, "force": force})
        return str(reply.get("final_status", ""))

    async def stored_events(self, execution_id: str, after_seq: int = 0) -> list[Stored]:
        """One page of an execution's stored events after `after_seq` (GetExecutionEvents, secrets
        redacted), oldest first; a page may stop short of the newest (ask again after its last)."""
        reply = await self.request("get_execution_events", {"execution_id": execution_id, "after_seq": after_seq})
        try:
            return [Stored(msgspec.convert(item["event"], AnyEvent), int(item["seq"])) for item in reply["events"]]
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            raise errors.Internal(f"get_execution_events replied with an event that is not one: {exc}") from None

    async def executions(
        self,
        task_id: str = "",
        status: str = "",
        limit: int = 100,
        start_after: str = "",
        function_name: str = "",
        order: str = "desc",
    ) -> dict[str, Any]:
        """One page of ListExecutions, newest first (`order="asc"`: oldest first): {"executions":
        [ExecutionInfo...], "has_more", "next_start_after"}. `status` is a status name or its
        suffix (`failed`)."""
        request: dict[str, Any] = {"task_id": task_id, "limit": limit, "start_after": start_after, "order": order}
        if function_name:
            request["function_name"] = function_name
        if status:
            request["status_filter"] = status
        return await self.request("list_executions", request)

    async def tasks(self, prefix: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        """The registered tasks whose id starts with `prefix`."""
        reply = await self.request("list_tasks", {"prefix": prefix, "limit": limit})
        return list(reply.get("tasks", []))

    async def task(self, task_id: str) -> dict[str, Any]:
        """A task's TaskInfo: functions, artifact, counts, the workers serving it, its instances."""
        reply = await self.request("get_task", {"task_id": task_id})
        return dict(reply["task"])

    async def register_task(
        self,
        artifact_type: str,
        location: str,
        *,
        task_id: str = "",
        checksum: str = "",
        task_name: str = "",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register a task at runtime (`process` or `python` artifact under the server's artifact
        roots; the server must allow registration, and NATS must let this user publish
        `P.api.register_task`). Idempotent for the same id and artifact. Returns its TaskInfo."""
        spec: dict[str, Any] = {"artifact_type": artifact_type, "location": location, "checksum": checksum}
        spec["metadata"] = dict(metadata or {})
        body = {"task_id": task_id, "task_name": task_name, "description": description, "artifact_spec": spec}
        reply = await self.request("register_task", body)
        return dict(reply["task"])

    async def delete_task(self, task_id: str, force: bool = False, cleanup_executions: bool = False) -> dict[str, Any]:
        """Delete a registered task; `force` cancels its live executions, `cleanup_executions`
        removes their history. Returns the reply (`cancelled_executions`, `cleaned_executions`)."""
        body = {"task_id": task_id, "force": force, "cleanup_executions": cleanup_executions}
        return await self.request("delete_task", body)

    async def health(self) -> dict[str, Any]:
        """GetHealth's reply."""
        return await self.request("get_health", {})

    async def workers(self, task_id: str = "") -> list[dict[str, Any]]:
        """The running workers (each a NATS micro service instance of `P-worker`): `worker_id`,
        `tasks`, `version`, `running_executions`."""
        reply = await self.request("list_workers", {"task_id": task_id} if task_id else {})
        return list(reply.get("workers", []))

    # --- the one request path --------------------------------------------------------------------

    async def request(
        self,
        operation: str,
        body: Mapping[str, Any],
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send one request to `P.api.<operation>` and return the reply object, or raise the typed
        error the reply stands for."""
        subject = self.names.api(operation)
        timeout = timeout or self.request_timeout
        data = json.dumps(body).encode()
        try:  # a gateway that is (re)starting has no responders for a moment: ask again
            msg = await poll_until(
                lambda: self.nc.request(subject, data, timeout=timeout, headers=headers),
                timeout_s=NO_RESPONDERS_RETRY_S,
                retry_on=lambda exc: isinstance(exc, nats.errors.NoRespondersError),
            )
        except nats.errors.NoRespondersError:
            raise errors.Unavailable(f"no spear gateway answers on {subject}: is `spear up` running?") from None
        except nats.errors.TimeoutError:
            raise errors.DeadlineExceeded(f"no reply on {subject} within {timeout:g} s") from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise errors.Unavailable(f"NATS connection lost: {_describe(exc)}") from None
        reply = _json(msg.data)
        if not isinstance(reply, dict):
            raise errors.Internal(f"{subject} replied with something that is not a JSON object")
        _raise_for(reply)
        return reply


def sync_wait(timeout: float | None, max_retries: int | None) -> float:
    """How long a SYNC caller waits for the reply: the server answers DEADLINE_EXCEEDED when its
    own wait (time limit × attempts + grace) ends, so this is a little longer than that."""
    return timeout * ((max_retries or 0) + 1) + 10 if timeout else 120.0


def invoke_request(
    task_id: str,
    function_name: str,
    mode: str,
    params: Mapping[str, Any],
    execution_id: str | None,
    timeout: float | None,
    max_retries: int | None,
) -> dict[str, Any]:
    """An InvokeFunctionRequest; `timeout` is the time limit in seconds."""
    context: dict[str, Any] = {}
    if timeout:
        context["timeout_ms"] = max(1, round(timeout * 1000))
    if max_retries is not None:
        context["max_retries"] = max_retries
    request: dict[str, Any] = {
        "task_id": task_id,
        "function_name": function_name,
        "parameters": [{"name": name, "value": value} for name, value in params.items()],
        "execution_mode": mode.upper(),
        "context": context,
    }
    if execution_id:
        request["execution_id"] = execution_id
    return request


def _raise_for(reply: Mapping[str, Any]) -> None:
    """Raise the request error a reply stands for: `success: false` with an `error_code`, or
    `found: false` (the get endpoints' not-found)."""
    code = reply.get("error_code") or ""
    if reply.get("success") is False and code:
        raise errors.request_error(
            str(code),
            str(reply.get("message", "")),
            execution_id=str(reply.get("execution_id", "")),
            final_status=str(reply.get("final_status", "")),
        )
    if reply.get("found") is False:
        raise errors.NotFound(str(reply.get("message") or "not found"))


def _outcome(execution_id: str, result: Mapping[str, Any]) -> Any:
    """The result of a COMPLETED execution, or the typed error of one that ended otherwise."""
    error = errors.outcome_error(execution_id, dict(result))
    if error is not None:
        raise error
    return result.get("result")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) or not text:
        return type(exc).__name__ if not isinstance(exc, TimeoutError) else "connection timed out"
    return text
