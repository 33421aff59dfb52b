"""A handle to an accepted execution: its status, its result (waited for by subscription), its
events and chunks as they are stored, and a way to cancel it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

import msgspec
import nats.errors
from nats.aio.msg import Msg

from spear import errors
from spear.client.results import Chunk, Event, Execution, stream_restart
from spear.client.wire import outcome
from spear.core.contract import JOINED_MESSAGE, validate_id
from spear.core.enums import ApiError
from spear.core.events import TERMINAL_KINDS
from spear.core.eventstore import Stored
from spear.service.follow import follow_stored, unsubscribed

if TYPE_CHECKING:
    from spear.client.async_client import Client


RECHECK_S = 5.0  # a wait reads the execution's status this often even when no end was announced
OUTAGE_S = 30.0  # how long events() and chunks() ride out a server that does not answer (a restart)


class ExecutionHandle:
    """An accepted execution: `id`, and ways to look at it, wait for it, follow it, cancel it."""

    def __init__(self, client: Client, execution_id: str, reply: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = execution_id
        self.reply = reply or {}  # the InvokeFunctionResponse that accepted it
        self.stream_subject: str = self.reply.get("stream_subject") or client.execution_subject(execution_id)

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.id!r})"

    @property
    def joined(self) -> bool:
        """Whether the call that made this handle joined an execution stored before under its id
        (it may have run already), rather than storing a new one."""
        return self.reply.get("message") == JOINED_MESSAGE

    def _check_id(self) -> None:
        """InvalidArgument, as the server says it, for an id that cannot be one: it would make a
        subject nats-py refuses (BadSubjectError: probe29) or one that is not the execution's."""
        try:
            validate_id(self.id, "execution_id")
        except ApiError as exc:
            raise errors.InvalidArgument(exc.message) from None

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
        return outcome(self.id, terminal)

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the execution to end and return its ExecutionResult (whatever the status).
        A live terminal message only wakes the wait up: the result is read back through the
        gateway (GetExecutionStatus), as anyone allowed to publish could imitate the message, and
        a least-privilege client may not read the stream itself (docs/design.md)."""
        self._check_id()
        wake = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            if msg.subject.rsplit(".", 1)[-1] in TERMINAL_KINDS:
                wake.set()

        closing = self.client._closing  # (the client's close wakes the wait up: it ends Unavailable)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        sub = await self.client.nc.subscribe(self.stream_subject, cb=on_event)
        try:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a Ctrl-C that comes
                # as the end arrives (see spear.service.follow). The first read is within the
                # wait too (probe45: a frozen server made `timeout=0.5` a wait of 10.5 s), but
                # for `timeout=0`: one look, as long as a request takes.
                async with asyncio.timeout_at(deadline if timeout else None):
                    try:
                        execution: Execution | None = await self.status()  # after subscribing: an end
                    except (errors.Unavailable, errors.DeadlineExceeded):  # stored meanwhile is in it
                        execution = None  # (a server restarting: read again below)
                if execution is not None and execution.done:
                    return dict(execution.raw.get("result") or {})
                async with asyncio.timeout_at(deadline):
                    while True:
                        # Woken by the terminal message, or every RECHECK_S anyway: one published
                        # while the connection was down (a server restart) is never delivered.
                        with contextlib.suppress(TimeoutError), closing.waking(wake):
                            async with asyncio.timeout(RECHECK_S):
                                await wake.wait()
                        wake.clear()
                        if closing.done:
                            raise self.client._closed_while_waiting()
                        try:
                            execution = await self.status()
                        except (errors.Unavailable, errors.DeadlineExceeded):  # a server restarting:
                            if closing.done:  # (closed meanwhile: said now, not retried: review22)
                                raise self.client._closed_while_waiting() from None
                            _ = self.client.nc  # (its connection closed under it, say)
                            continue  # try again, within the timeout
                        if execution.done:
                            return dict(execution.raw.get("result") or {})
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"execution {self.id} had not ended after {timeout:g} s", execution_id=self.id
                ) from None
        finally:
            await unsubscribed(sub)  # (not nats-py's ConnectionClosedError in place of what ends the wait)

    async def events(self, after_seq: int = 0, idle_s: float = 15.0) -> AsyncGenerator[Event, None]:
        """The execution's stored events in order, then each new one as it is stored, until the
        terminal event. Each event comes once, read back through the gateway
        (`P.api.get_execution_events`: redacted, and allowed to a least-privilege client); live
        messages only wake the reader up (spear.service.follow). A server that does not answer
        for a while (a restart) is asked again, for up to OUTAGE_S, before `Unavailable` is raised:
        the reader goes on where it was, each event still once."""
        self._check_id()
        closing = self.client._closing  # (the client's close wakes the reader up: it ends Unavailable)
        wake = asyncio.Event()

        async def stored_after(seq: int) -> list[Stored]:
            loop = asyncio.get_running_loop()
            deadline, pause_s = loop.time() + OUTAGE_S, 0.1
            while True:
                if closing.done:
                    raise self.client._closed_while_waiting()
                try:
                    return await self.client.stored_events(self.id, seq)
                except (errors.Unavailable, errors.DeadlineExceeded):  # a read: asking again is safe
                    if closing.done:  # (closed meanwhile: said now, not retried)
                        raise self.client._closed_while_waiting() from None
                    if loop.time() + pause_s > deadline:
                        raise
                closed = asyncio.Event()  # a pause the client's close cuts short
                with contextlib.suppress(TimeoutError), closing.waking(closed):
                    async with asyncio.timeout(pause_s):
                        await closed.wait()
                pause_s = min(pause_s * 2, 2.0)

        stored_events = cast(
            AsyncGenerator[Stored | None, None],
            follow_stored(self.client.nc, self.stream_subject, stored_after, after_seq, idle_s, True, wake=wake),
        )
        async with aclosing(stored_events):
            try:
                with closing.waking(wake):
                    async for stored in stored_events:
                        if stored is not None:
                            yield _as_event(stored)
            except nats.errors.ConnectionClosedError:  # (its connection closed under it: never nats-py's error)
                if closing.done:
                    raise self.client._closed_while_waiting() from None
                raise errors.Unavailable(
                    f"the NATS connection closed while execution {self.id}'s events were read"
                ) from None

    async def last_run_start(self) -> int:
        """The stream sequence just before the stored history's last run of this STREAM execution
        (0: there was one run so far): a reader joining it by id starts there, and skips the
        runs a restart made void, whose ends are stored already (probe55: joined after a retry,
        `Client.stream` raised StreamRestarted at every try and never yielded the last run)."""
        start, chunked, seq = 0, False, 0
        while page := await self.client.stored_events(self.id, seq):
            for stored in page:
                event = _as_event(stored)
                if event.type == "chunk":
                    chunked = True
                elif chunked and stream_restart(event) is not None:
                    start, chunked = stored.seq - 1, False
                seq = stored.seq
        return start

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """The items a STREAM function yields, as they are stored (a late reader replays what it
        missed), then returns when the execution completes; raises its error if it did not. Each
        attempt's items come in full: a retried attempt starts again at `seq` 0 with its own
        `attempt` (its items need not be the earlier attempt's), and a run handed back by a
        stopping worker, or whose worker was lost, runs again as the same attempt from `seq` 0; so
        a reader that shows them drops what it kept when `attempt` changes or `seq` goes back to
        0. A function that is not a
        generator stores no chunk (its output is its result: `Client.stream` yields it)."""
        async for event in self.events():  # (each event once, in order)
            if event.type == "chunk":
                yield Chunk(int(event.data.get("seq", 0)), event.data.get("data"), event.attempt)
            elif event.terminal:
                outcome(self.id, event.result)


def _as_event(stored: Stored) -> Event:
    """A stored event as the client's readers see it."""
    return Event(stored.seq, stored.event.kind, msgspec.to_builtins(stored.event))
