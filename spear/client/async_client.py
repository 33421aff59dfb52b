"""The async client: one NATS connection, one request path (`request`), and a method an
operation of the wire contract."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import ssl
import sys
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from contextlib import aclosing
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from spear import errors
from spear.aio import poll_until
from spear.client.connection import open_connection
from spear.client.handle import ExecutionHandle
from spear.client.results import Execution, stream_restart
from spear.client.wire import describe, invoke_request, outcome, parse_json, raise_for, seconds_given, sync_wait
from spear.core.config import TOKEN_REGEX, TOKEN_RULE, nats_url_problem, shown_url
from spear.core.events import AnyEvent
from spear.core.eventstore import Stored
from spear.core.ids import new_execution_id
from spear.core.names import Names
from spear.jetstream import hpub
from spear.jetstream.errors import permission_denied
from spear.service.callerwait import NEW_ID_HEADER, WAIT_HEADER

# A gateway restarting (or not up yet) answers "no responders": asked again for this long.
NO_RESPONDERS_RETRY_S = 1.0
REFUSAL_CHECK_S = 0.05  # how often a request not answered yet looks for the server's refusal of it
# A call refused RESOURCE_EXHAUSTED, or UNAVAILABLE by a gateway, is asked again after a pause
# growing from the first to the last, while its time allows (a SYNC call's wait, else the
# request timeout)
BUSY_FIRST_PAUSE_S = 0.025
BUSY_LAST_PAUSE_S = 1.0
BUSY_RETRY_S = 10.0  # and for at most this long
# Asked again when the connection is made again while they wait (the request or its reply may have
# been lost with the old one): reads, and InvokeFunction, whose execution id makes it idempotent
REPEATABLE = frozenset(
    {
        "invoke_function",
        "get_execution_status",
        "get_execution_events",
        "list_executions",
        "list_tasks",
        "get_task",
        "get_health",
        "get_stats",
        "list_workers",
    }
)


class Closing:
    """The `close` of a Client's connection, as the calls made on it see it: each looks whether
    it came (`done`), and one that waits for a message asks to be woken by it (`waking`), so that
    every call in flight ends at once, Unavailable, rather than at its timeout (probe29)."""

    def __init__(self) -> None:
        self.done = False
        self._wakes: set[asyncio.Event] = set()

    def set(self) -> None:
        """The client is closed: every wait in flight is woken up."""
        self.done = True
        for wake in self._wakes:
            wake.set()

    @contextlib.contextmanager
    def waking(self, wake: asyncio.Event) -> Iterator[None]:
        """While in the block, the close sets `wake` (at once if it came already)."""
        self._wakes.add(wake)
        if self.done:
            wake.set()
        try:
            yield
        finally:
            self._wakes.discard(wake)


def _server_list(servers: str | Iterable[str] | None) -> list[str]:
    """The URLs of a comma-separated list, or of a list, blanks left out."""
    if isinstance(servers, str):
        servers = servers.split(",")
    return [url.strip() for url in servers or () if url.strip()]


def _parameters(params: Mapping[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's parameters, from `params` and keyword arguments; a name given both ways is a
    TypeError, as Python says of a keyword argument given twice (probe29: the keyword won)."""
    both = sorted(set(params or ()) & set(kwargs))
    if both:
        raise TypeError(f"parameter {both[0]!r} is given both in params and as a keyword argument")
    return {**(params or {}), **kwargs}


class Client:
    """An async spear client over NATS.

    `servers`: one NATS URL, a comma-separated list, or a list (a cluster); by default (None, or
    nothing but blanks, as an unset variable gives) `$SPEAR_NATS_URL`, else nats://127.0.0.1:4222.
    `prefix`: the subject prefix spear runs under (default `$SPEAR_SUBJECT_PREFIX`, else `spear`).
    Credentials: `user` + `password`, `token`, or `creds_file`; `tls`: an SSLContext (a `tls://`
    URL alone uses nats-py's default one).
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
        # An empty list reached nats-py, whose choice of server then spun for ever (probe28:
        # `Client(os.environ.get("NATS_URL", ""))`): none given is the default, as on the CLI.
        self.servers = (
            _server_list(servers) or _server_list(os.environ.get("SPEAR_NATS_URL")) or ["nats://127.0.0.1:4222"]
        )
        for url in self.servers:  # (else nats-py's failure to parse it reads as NATS unavailable)
            problem = nats_url_problem(url)
            if problem:
                raise ValueError(f"NATS URL {shown_url(url)!r} {problem}")
        self.prefix = prefix or os.environ.get("SPEAR_SUBJECT_PREFIX") or "spear"
        if not re.match(TOKEN_REGEX, self.prefix):  # (probe33: `a b` reached nats-py, `>` looked like an outage)
            raise ValueError(f"prefix {self.prefix!r} {TOKEN_RULE} (as spear's subject_prefix)")
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
        self._loop: asyncio.AbstractEventLoop | None = None  # where the connection was made
        self._connecting: asyncio.Future[Nats] | None = None
        self._connecting_for: Closing | None = None  # the close that ends what it connects
        # What the calls in flight see of `close`: one a connection (`connect` after `close` makes
        # a new one), taken by each call as it starts, so a call never outlives the close it missed
        self._closing = Closing()

    # --- connection ------------------------------------------------------------------------------

    @property
    def nc(self) -> Nats:
        """The NATS connection; Unavailable if the client is not connected (or was closed)."""
        if self._closing.done:  # (a connection we were given stays open: the client is closed all the same)
            raise errors.Unavailable("the client is not connected: it was closed (`await connect()` connects it again)")
        if self._nc is None or self._nc.is_closed:
            raise errors.Unavailable("the client is not connected: use `async with Client(...)` or `await connect()`")
        running = _running_loop()
        if self._loop is not None and running is not None and self._loop is not running:
            raise _connected_elsewhere()  # (probe33: a second asyncio.run() waited out every timeout)
        return self._nc

    def _closed_while_waiting(self) -> errors.Unavailable:
        """The error a call in flight ends with when the client is closed under it."""
        return errors.Unavailable("the client was closed while the call waited")

    @property
    def stream_name(self) -> str:
        """The executions stream of the prefix."""
        return self.names.stream

    def execution_subject(self, execution_id: str) -> str:
        """The subjects of one execution's stored events."""
        return self.names.execution_events(execution_id)

    async def connect(self) -> Client:
        """Connect within `connect_timeout` or raise `Unavailable` naming the servers and why."""
        if self._closing.done:
            self._closing = Closing()  # (the calls of before the close have ended with it)
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            if not self._loop.is_closed() and self._nc is not None and not self._nc.is_closed:
                raise _connected_elsewhere()  # (one open in a loop still running: its connection is its own)
            self._nc, self._connecting = None, None  # that loop is gone, or its connection closed
        if self._nc is not None and not self._nc.is_closed:
            return self  # (reconnecting too: a second connection would be left reconnecting for ever, review32)
        # One connection however many connect at once (probe33: five made five, four left open),
        # taken by the client even if every caller gave up waiting for it (review31: left open)
        closing = self._closing
        if self._connecting is None or self._connecting.done() or self._connecting_for is not closing:
            # (a connect begun before a close is that close's: review32 saw a later connect join
            # it, and get the connection the close then closed)
            opening = open_connection(self.servers, self._credentials, self.name, self.connect_timeout)
            self._connecting, self._connecting_for = asyncio.ensure_future(opening), closing
            self._connecting.add_done_callback(functools.partial(self._made, closing, loop))
        nc = await asyncio.shield(self._connecting)
        if closing.done:
            raise errors.Unavailable("the client was closed while it connected")
        self._nc, self._loop = nc, loop
        return self

    def _made(self, closing: Closing, loop: asyncio.AbstractEventLoop, connecting: asyncio.Future[Nats]) -> None:
        """A connection is made: the client's, or closed at once if the client was closed meanwhile."""
        if connecting.cancelled() or connecting.exception() is not None:
            return
        nc = connecting.result()
        if closing.done:  # (review31: a close during the connect left this one open)
            _closing_connections.add(task := loop.create_task(nc.close()))
            task.add_done_callback(_closing_connections.discard)
            return
        self._nc, self._loop = nc, loop

    async def close(self) -> None:
        """Close the connection (one the client was given stays open). Calls in flight (in other
        tasks) end at once, Unavailable, and later ones are refused so, until `connect`. A
        connection whose server is gone is closed all the same: nats-py's flush of it raises the
        reset it finds."""
        self._closing.set()  # first: nats-py's close leaves a request waiting for its reply to its timeout
        if self._loop is not None and self._loop.is_closed():  # (its loop is gone, and the connection with it)
            self._nc, self._connecting = None, None
        if self._nc is not None and self._owns_connection and not self._nc.is_closed:
            try:
                await self._nc.close()
            except ConnectionError:
                if not self._nc.is_closed:
                    raise

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
        `params` for names that clash with these options; they go as JSON, written as spear
        stores values (tuples and sets as arrays, bytes as base64 text, datetimes as RFC 3339
        text), and one JSON cannot hold (NaN, keys 1 and "1" in one dict) is InvalidArgument.
        `timeout` is the execution's time limit in seconds (default: the server's);
        `execution_id` an idempotency key; `wait` how long to wait for the reply (default: a
        little longer than the gateway waits: the time limit × attempts and the backoffs between
        them, + 10 s, at most a week; without a `timeout`, its default longest wait + 10 s, 310 s)."""
        wait_s = sync_wait(timeout, max_retries) if wait is None else seconds_given("wait", wait)
        parameters = _parameters(params, kwargs)
        reply = await self._invoke(
            task_id, function_name, "SYNC", parameters, execution_id, timeout, max_retries, wait_s
        )
        return outcome(reply.get("execution_id", ""), reply.get("result") or {})

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
        parameters = _parameters(params, kwargs)
        reply = await self._invoke(task_id, function_name, mode, parameters, execution_id, timeout, max_retries)
        return ExecutionHandle(self, reply["execution_id"], reply)

    async def _invoke(
        self,
        task_id: str,
        function_name: str,
        mode: str,
        parameters: Mapping[str, Any],
        execution_id: str | None,
        timeout: float | None,
        max_retries: int | None,
        wait_s: float | None = None,
    ) -> dict[str, Any]:
        """InvokeFunction's reply; `wait_s`: how long a SYNC caller waits for it.

        The execution id is made here when the caller gives none (a ULID, as the gateway would):
        should the reply never come (a restart, a lost connection), the error still names the
        execution, which may have been stored and go on, and asking again with it runs nothing
        twice. `Spear-New-Execution-Id` tells the gateway the id is new, so it still runs an
        inline function's SYNC call itself (spear.service.callerwait)."""
        _ = self.nc  # not connected: said so, naming no execution it never sent (probe28)
        headers: dict[str, str] = {}
        if execution_id is None:
            execution_id = new_execution_id()
            headers[NEW_ID_HEADER] = "true"
        request = invoke_request(task_id, function_name, mode, parameters, execution_id, timeout, max_retries)
        return await self.invoke_function(request, headers, wait_s)

    async def invoke_function(
        self, request: dict[str, Any], headers: dict[str, str] | None = None, wait_s: float | None = None
    ) -> dict[str, Any]:
        """InvokeFunction's reply to `request` (as `spear.client.wire.invoke_request` makes it),
        asked again after a refusal that stored nothing or joins: busy (RESOURCE_EXHAUSTED), or,
        for an ASYNC or STREAM call, UNAVAILABLE naming the execution, while `wait_s` (a SYNC
        caller's wait; default: the request timeout) allows. `headers`: `Spear-New-Execution-Id`
        when the id was made just now (dropped once asked again); a request without an id is
        given one so. The CLI's `invoke` asks this way too."""
        headers = dict(headers or {})
        if request.get("execution_id") is None:  # ("" is sent: the gateway refuses it, as any bad id)
            request = {**request, "execution_id": new_execution_id()}
            headers[NEW_ID_HEADER] = "true"
        execution_id = str(request["execution_id"])
        # A SYNC call of an inline function runs in the gateway before anything is stored: after
        # its UNAVAILABLE, asking again would run it again (review62). Other calls run nothing
        # before their `requested` is stored, and asking again with the id joins it if it was.
        mode = str(request.get("execution_mode", "")).upper().removeprefix("EXECUTION_MODE_")
        unavailable_again = mode in ("ASYNC", "STREAM")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait_s if wait_s is not None else self.request_timeout)
        busy_until = loop.time() + BUSY_RETRY_S  # (a full store is refused so too: not for the whole wait)
        pause_s = BUSY_FIRST_PAUSE_S
        try:
            while True:
                left_s = max(0.001, deadline - loop.time())
                # Saying how long we wait lets the gateway end its wait (and free its SYNC slot) in time.
                if wait_s is not None:
                    headers[WAIT_HEADER] = str(int(left_s * 1000))
                try:
                    return await self.request("invoke_function", request, left_s, headers=headers or None)
                except (errors.ResourceExhausted, errors.Unavailable) as exc:
                    # RESOURCE_EXHAUSTED: nothing was stored (a gateway at its limit of SYNC calls
                    # or a full queue). UNAVAILABLE from a gateway, naming an ASYNC or STREAM
                    # execution: JetStream did not store it (a stream leader lost: probe58), or
                    # did not say so, and asking again with its id joins it if it was. Asked again
                    # after a pause, while the call's time allows, as a client of a busy server
                    # would (probe56: 200 of 300 gathered calls refused at once).
                    if isinstance(exc, errors.Unavailable) and (
                        not unavailable_again or not exc.execution_id or isinstance(exc, errors.NoGateway)
                    ):
                        raise  # (or not the gateway's answer: the connection's, said as it is)
                    pause_s = min(pause_s * 2, BUSY_LAST_PAUSE_S)
                    if loop.time() + pause_s >= min(deadline, busy_until):
                        raise
                    await asyncio.sleep(random.uniform(pause_s / 2, pause_s))
                    # Said new no more: a reconnect meanwhile may have asked again and stored it,
                    # and the gateway would run an inline function again before finding it (review59)
                    headers.pop(NEW_ID_HEADER, None)
        except (errors.DeadlineExceeded, errors.Unavailable) as exc:
            # (no gateway: nobody received it, so the id the call would have had names nothing: probe39)
            if exc.execution_id or isinstance(exc, errors.NoGateway):
                raise
            message = f"{exc.message}; execution {execution_id} may be stored and go on: query it, or ask again with it"
            raise type(exc)(message, execution_id=execution_id) from None

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
        execution's error if it does not complete. A function that is not a generator yields
        what it returned (unless None), once it has ended. Should the function start again after
        items were yielded (an attempt failed and is retried, a stopping worker handed it back, its
        worker was lost), `StreamRestarted` is raised: the items that came are to be dropped, and
        `execution(id).chunks()` follows every run."""
        handle = await self.submit(
            task_id,
            function_name,
            params=params,
            execution_id=execution_id,
            timeout=timeout,
            mode="STREAM",
            **kwargs,
        )
        chunked = False
        # joined by its id, it may have run before: its last run only (a new one's every run: probe61)
        events = handle.events(after_seq=await handle.last_run_start() if handle.joined else 0)
        async with aclosing(events):
            async for event in events:
                if event.type == "chunk":
                    chunked = True
                    yield event.data.get("data")
                elif chunked and (restart := stream_restart(event)) is not None:  # what came is void
                    attempt, what = restart
                    raise errors.StreamRestarted(
                        f"{what} after execution {handle.id} yielded items; "
                        f"attempt {attempt} yields from the start again",
                        execution_id=handle.id,
                        attempt=attempt,
                    )
                elif event.terminal:
                    outcome(handle.id, event.result)
        # No chunk: a function that is not a generator (its output is its result), or a generator
        # that yielded nothing. Only then is the catalog asked (it reads every state: not cheap).
        if not chunked and not await self.yields_items(task_id, function_name):
            value = await handle.result()
            if value is not None:
                yield value

    async def yields_items(self, task_id: str, function_name: str) -> bool:
        """Whether the function is a generator, whose items are its stream's chunks (the task's
        catalog says; True when it cannot say). One that is not stores no chunk in STREAM mode:
        its output is its result."""
        try:
            task = await self.task(task_id)
        except errors.SpearError:  # not found, not allowed: the call itself will say
            if self._closing.done:
                raise  # (closed meanwhile: the stream did not end)
            return True
        if (task.get("artifact_spec") or {}).get("artifact_type") == "process":
            return True  # a process artifact streams its stdout lines (CONTRACT §8)
        kinds = {function.get("name"): function.get("streaming", True) for function in task.get("functions", [])}
        return bool(kinds.get(function_name, True))

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
        try:
            reply = await self.request(
                "cancel_execution", {"execution_id": execution_id, "reason": reason, "force": force}
            )
        except errors.SpearError as exc:  # (the reply names no execution: this one it is about)
            exc.execution_id = exc.execution_id or execution_id
            raise
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
        data = msgspec.json.encode(body)  # (parameters come encoded already: msgspec.Raw)
        headers = with_trace_context(headers)
        nc = self.nc
        closing = self._closing
        # nats-py would raise its own MaxPayloadError (probe28), or the server, counting the
        # headers too, would close the connection and every request on it (review22)
        size = len(data) + (len(hpub.header_block(headers)) if headers else 0)
        if size > nc.max_payload:
            raise errors.PayloadTooLarge(
                f"the request is {size} bytes, over the {nc.max_payload} bytes NATS takes in one message"
            )
        reconnects_before = nc.stats["reconnects"]
        asking = _Asking(nc, subject, data, headers, timeout, operation in REPEATABLE)
        try:
            # A publish the server refuses (this user may not: `register_task` as a client under
            # --secure) is dropped and said only asynchronously: told now, not as a timeout.
            while not (await asyncio.wait({asking.reply}, timeout=REFUSAL_CHECK_S))[0]:
                if closing.done:  # (nats-py's close leaves the request to its timeout: minutes for SYNC)
                    raise self._closed_while_waiting()
                refused = permission_denied(nc, subject)
                if refused is not None:
                    raise errors.PermissionDenied(refused)
                asking.again_if_reconnected()
            msg = asking.reply.result()
        except nats.errors.NoRespondersError:
            if asking.asked_again:  # (review40: the first asking, before the reconnect, may have been received)
                raise errors.Unavailable(f"no spear gateway answers on {subject} since NATS reconnected") from None
            raise errors.NoGateway(
                f"no spear gateway answers on {subject}: is `spear up` running, under subject prefix "
                f"{self.prefix!r} (SPEAR_SUBJECT_PREFIX)?"
            ) from None
        except nats.errors.TimeoutError:
            # nats-py holds what is sent while it reconnects: a NATS that is down is a timeout here
            if not nc.is_connected:
                raise errors.Unavailable(
                    f"NATS cannot be reached (the client is {_connection_state(nc)}): no reply on {subject} "
                    f"within {timeout:g} s"
                ) from None
            lost = nc.stats["reconnects"] > reconnects_before
            raise errors.DeadlineExceeded(
                f"no reply on {subject} within {timeout:g} s"
                + ("; the NATS connection was lost and made again meanwhile, and the reply with it" if lost else "")
            ) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            if closing.done:
                raise self._closed_while_waiting() from None
            raise errors.Unavailable(f"NATS connection lost: {describe(exc)}") from None
        finally:
            asking.give_up()  # (done already, unless refused or given up on)
        reply = parse_json(msg.data)
        if not isinstance(reply, dict):
            raise errors.Internal(f"{subject} replied with something that is not a JSON object")
        raise_for(reply)
        return reply


def with_trace_context(headers: dict[str, str] | None) -> dict[str, str] | None:
    """`headers` with the caller's trace context (`traceparent`), when the application traces
    with OpenTelemetry, so that what spear does for a call joins the caller's trace (probe54: it
    began a trace of its own; the HTTP API took `traceparent`, the SDK sent none). An application
    that does not use OpenTelemetry does not load it here."""
    if "opentelemetry.trace" not in sys.modules or (headers and "traceparent" in headers):
        return headers
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {**(headers or {}), **carrier} if carrier else headers


class _Asking:
    """One request in flight, asked again when the connection is made again while it waits (the
    request or its reply may be lost with the old one: probe30 saw a submit wait out its 20 s
    after a node loss), if it may be repeated (`REPEATABLE`)."""

    def __init__(
        self, nc: Nats, subject: str, data: bytes, headers: dict[str, str] | None, timeout: float, repeatable: bool
    ) -> None:
        self.nc, self.subject, self.data, self.headers, self.repeatable = nc, subject, data, headers, repeatable
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.reconnects = nc.stats["reconnects"]
        self.asked_again = False  # (then the first asking may have been received, whatever came of this one)
        self.reply = self._ask(headers)

    def _ask(self, headers: dict[str, str] | None) -> asyncio.Future[Msg]:
        left = max(0.001, self.deadline - asyncio.get_running_loop().time())
        # a gateway that is (re)starting has no responders for a moment: ask again
        return asyncio.ensure_future(
            poll_until(
                lambda: self.nc.request(self.subject, self.data, timeout=left, headers=headers),
                timeout_s=NO_RESPONDERS_RETRY_S,
                retry_on=lambda exc: isinstance(exc, nats.errors.NoRespondersError),
            )
        )

    def again_if_reconnected(self) -> None:
        """Ask again if the connection was made again since it was last asked."""
        if not self.repeatable or self.nc.stats["reconnects"] == self.reconnects or not self.nc.is_connected:
            return
        self.reconnects = self.nc.stats["reconnects"]
        self.give_up()
        self.asked_again = True
        self.reply = self._ask(self._headers_again())

    def give_up(self) -> None:
        """Stop waiting for the latest asking. nats-py's request may let the cancel pass (its
        reply came meanwhile) and go on asking: what it ends with is read here, not printed as
        "Task exception was never retrieved" (probe56: a dozen tracebacks per NATS restart)."""
        if self.reply.done():
            _read_outcome(self.reply)
        else:
            self.reply.cancel()
            self.reply.add_done_callback(_read_outcome)

    def _headers_again(self) -> dict[str, str] | None:
        """The wait left, and an execution id made for the request no longer new (the first one
        may have stored it: the gateway then joins it)."""
        if not self.headers:
            return self.headers
        again = {name: value for name, value in self.headers.items() if name != NEW_ID_HEADER}
        if WAIT_HEADER in again:
            again[WAIT_HEADER] = str(max(1, int((self.deadline - asyncio.get_running_loop().time()) * 1000)))
        return again


def _read_outcome(asking: asyncio.Future[Msg]) -> None:
    """Retrieve an abandoned asking's outcome, so that nobody is told it was never read."""
    if not asking.cancelled():
        asking.exception()


def _connection_state(nc: Nats) -> str:
    """How the NATS connection stands, in words."""
    if nc.is_reconnecting:
        return f"reconnecting to {nc.connected_url.netloc if nc.connected_url else 'its servers'}"
    return "closed" if nc.is_closed else "not connected"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_closing_connections: set[asyncio.Task[None]] = set()  # (held while they close: tasks are weakly kept)


def _connected_elsewhere() -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        "this Client was connected in another event loop (an earlier asyncio.run?): use a Client made"
        " and connected in this one"
    )
