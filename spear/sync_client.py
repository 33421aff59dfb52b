"""`SyncClient`: spear's client for scripts and REPLs that do not run an event loop.

It runs one event loop in a background thread for its whole life, so the NATS connection is made
once and reused by every call; each method hands a coroutine of `spear.Client` to that loop and
waits for it. Use it as a context manager, or call `close()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from spear import errors
from spear.client import Client, Execution, ExecutionHandle

T = TypeVar("T")
CLOSED_CHECK_S = 0.5  # how often a waiting call looks whether the client was closed under it
UNWIND_S = 5.0  # how long an interrupted call may take to end on the loop (a stream's unsubscribing, under load)


class SyncClient:
    """The blocking form of `spear.Client` (same arguments, same errors)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        running = threading.Event()
        self._loop.call_soon(running.set)  # (the loop is not running yet: no other thread touches it)
        self._thread = threading.Thread(target=self._loop.run_forever, name="spear-sync-client", daemon=True)
        self._thread.start()
        # Until its thread runs the loop, the client would say it is closed (CI: a loaded machine
        # started the thread late, and a new SyncClient raised "the client is closed")
        running.wait()
        self.client = Client(*args, **kwargs)
        self._iterating: weakref.WeakSet[Any] = weakref.WeakSet()  # async iterators driven: closed with it
        self._in_flight: set[asyncio.Task[Any]] = set()  # the tasks of calls waited for, by any thread
        self._closed = False  # set first thing in `close`, before the loop stops
        try:
            self._call(self.client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if os.getpid() != self._pid:  # (probe33: the loop's thread is not in a forked child: it hung)
            coroutine.close()
            raise errors.FailedPrecondition("this SyncClient was made before a fork: make one in this process")
        if self._closed or not self._loop.is_running():  # what Client says then (probe28: a bare RuntimeError)
            coroutine.close()
            raise errors.Unavailable("the client is closed: use a new SyncClient")
        return self._wait(coroutine)

    def _wait(self, coroutine: Coroutine[Any, Any, T], closing: bool = False) -> T:
        """Run a coroutine on the loop and wait for it, ending Unavailable if the client closes
        (`closing`: one of `close`'s own). Interrupted (Ctrl-C, or what a signal handler raises),
        the call is ended on the loop before the interruption goes on (probe33: it went on in the
        background, and a stream's generator, still running, could not be closed)."""
        call = _CallOnLoop(coroutine)
        future: concurrent.futures.Future[T] = call.future
        try:
            # Handed over inside the `try`, the coroutine kept by `call` until the loop takes it:
            # interrupted even within the hand-off, the call is given up (CI: Ctrl-C landed in
            # run_coroutine_threadsafe, its callback queued, before the future it returned was ours
            # to abandon; the call ran all the same, in flight after the interruption).
            self._loop.call_soon_threadsafe(self._start, call, closing)
            while True:
                # Waited for apart from its outcome: the call's own DeadlineExceeded is a
                # TimeoutError, as `result(timeout)`'s is (probe41: taken for the poll's, it was
                # raised again at every poll, for ever).
                if concurrent.futures.wait((future,), timeout=CLOSED_CHECK_S).done:
                    return future.result(timeout=0)
                # Closed meanwhile (by another thread), this call's coroutine perhaps never run:
                # its thread waited for ever (review22); or the interpreter is exiting, and the
                # loop's thread, a daemon, runs no more (probe33: a script never ended)
                if not self._loop.is_running() or sys.is_finalizing():
                    if future.done():  # (it ended as the loop stopped: its own error names its execution)
                        return future.result(timeout=0)
                    future.cancel()
                    raise errors.Unavailable("the client was closed while the call waited")
        except concurrent.futures.CancelledError:
            raise errors.Unavailable("the client was closed while the call waited") from None
        except BaseException as error:
            # (an interruption met first: the call's own error, raised on the loop, is not one)
            interrupt = None if _is_outcome(future, error) else _interruption(error)
            if not future.done():
                self._abandon(call)
            if interrupt is not None:
                raise interrupt from None
            raise

    def _abandon(self, call: _CallOnLoop) -> None:
        """End a call its thread no longer waits for: it never starts if it has not yet, else it is
        let unwind (bounded). (CI: one interrupted before the loop ran it started afterwards, and
        sent its request all the same.)"""
        call.future.cancel()
        with call.lock:
            coroutine, call.coroutine = call.coroutine, None
            task = call.task
        if coroutine is not None:  # the loop has not taken it: it never will
            coroutine.close()
        elif task is not None and self._loop.is_running():
            with contextlib.suppress(BaseException):  # (a second Ctrl-C: the first one goes on)
                ended = asyncio.run_coroutine_threadsafe(_cancelled(task), self._loop)
                ended.result(timeout=UNWIND_S + CLOSED_CHECK_S)

    def _start(self, call: _CallOnLoop, closing: bool) -> None:
        """On the loop: run a call handed to it, unless its thread gave up on it first."""
        with call.lock:
            coroutine, call.coroutine = call.coroutine, None
            if coroutine is None:  # its thread stopped waiting before the loop got to it
                return
            if call.future.cancelled():  # (the client closed under it as it was handed over)
                coroutine.close()
                return
            call.task = self._loop.create_task(self._in_flight_while(coroutine, closing))
        call.task.add_done_callback(call.settle)

    async def _in_flight_while(self, coroutine: Coroutine[Any, Any, T], closing: bool) -> T:
        """Await a call, known to `close` meanwhile: it ends it while the loop still runs."""
        if self._closed and not closing:  # (sent as `close` began: past the calls it ends)
            coroutine.close()
            raise errors.Unavailable("the client was closed while the call waited")
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            return await coroutine
        finally:
            self._in_flight.discard(task)

    async def _end_in_flight(self) -> None:
        """Cancel the calls other threads wait for, and let them unwind on this loop (else their
        coroutines are closed later, by the garbage collector, on a closed loop)."""
        others = self._in_flight - {asyncio.current_task()}
        if others:  # told by the client's close, most end on their own, naming their execution
            _, others = await asyncio.wait(others, timeout=CLOSED_CHECK_S)
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=CLOSED_CHECK_S)

    def invoke(self, task_id: str, function_name: str, /, **kwargs: Any) -> Any:
        """Invoke and wait: the function's result (see Client.invoke)."""
        return self._call(self.client.invoke(task_id, function_name, **kwargs))

    def submit(self, task_id: str, function_name: str, /, **kwargs: Any) -> SyncHandle:
        """Invoke without waiting: a handle (see Client.submit)."""
        return SyncHandle(self, self._call(self.client.submit(task_id, function_name, **kwargs)))

    def execution(self, execution_id: str) -> SyncHandle:
        """A handle on an existing execution."""
        return SyncHandle(self, self.client.execution(execution_id))

    def stream(self, task_id: str, function_name: str, /, **kwargs: Any) -> Iterator[Any]:
        """Invoke a streaming function: its items as they are stored."""
        return self._iterate(self.client.stream(task_id, function_name, **kwargs))

    def status(self, execution_id: str, include_logs: bool = False) -> Execution:
        """An execution's status."""
        return self._call(self.client.status(execution_id, include_logs))

    def cancel(self, execution_id: str, reason: str = "", force: bool = False) -> str:
        """Cancel an execution; its status after the request."""
        return self._call(self.client.cancel(execution_id, reason, force))

    def executions(self, **kwargs: Any) -> dict[str, Any]:
        """One page of ListExecutions (see Client.executions)."""
        return self._call(self.client.executions(**kwargs))

    def tasks(self, prefix: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        """The registered tasks (see Client.tasks)."""
        return self._call(self.client.tasks(prefix, limit))

    def workers(self, task_id: str = "") -> list[dict[str, Any]]:
        """The running workers, of one task if given (see Client.workers)."""
        return self._call(self.client.workers(task_id))

    def task(self, task_id: str) -> dict[str, Any]:
        """GetTask's task (see Client.task)."""
        return self._call(self.client.task(task_id))

    def register_task(self, artifact_type: str, location: str, **options: Any) -> dict[str, Any]:
        """Register a task at runtime (see Client.register_task)."""
        return self._call(self.client.register_task(artifact_type, location, **options))

    def delete_task(self, task_id: str, force: bool = False, cleanup_executions: bool = False) -> dict[str, Any]:
        """Delete a task (see Client.delete_task)."""
        return self._call(self.client.delete_task(task_id, force, cleanup_executions))

    def health(self) -> dict[str, Any]:
        """GetHealth's reply."""
        return self._call(self.client.health())

    def _iterate(self, iterator: Any) -> Iterator[Any]:
        """Drive an async iterator on the loop, one item per step."""
        self._iterating.add(iterator)
        try:
            while True:
                try:
                    yield self._call(iterator.__anext__())
                except StopAsyncIteration:
                    if self._closed:  # `close` ended it between two items: not the stream's end (CI)
                        raise errors.Unavailable("the client was closed while the stream was read") from None
                    return
        finally:
            self._iterating.discard(iterator)
            if not self._closed and self._loop.is_running() and not sys.is_finalizing():
                # (else `close` closed it, on its loop; or the loop's thread runs no more)
                with contextlib.suppress(Exception):  # what ended the iteration is what the caller sees
                    self._call(iterator.aclose())

    def close(self) -> None:
        """Close the connection and stop the client's event loop thread."""
        if os.getpid() != self._pid:  # a forked child: the loop's thread is not here (review31: it hung)
            self._closed = True
            return
        if self._closed or not self._loop.is_running():
            return
        self._closed = True  # from now on no call starts, and a stream that ends was ended by the close
        # The client's close first: the calls other threads wait for end as Client's do, Unavailable
        # and naming their execution (probe33: cancelled, they named none); any left are cancelled.
        with contextlib.suppress(Exception):
            self._wait(self.client.close(), closing=True)
        self._wait(self._end_in_flight(), closing=True)
        for iterator in list(self._iterating):  # a stream left open: closed now, not at exit (probe28)
            with contextlib.suppress(Exception):
                self._wait(iterator.aclose(), closing=True)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _CallOnLoop:
    """A call a thread hands to the client's loop and waits for: its coroutine until the loop
    takes it, or the thread gives up first (then it never runs); its task once the loop runs it;
    its outcome, for the thread."""

    __slots__ = ("coroutine", "future", "lock", "task")

    def __init__(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.lock = threading.Lock()  # (taken by the waiting thread and the loop's, for a moment)
        self.coroutine: Coroutine[Any, Any, Any] | None = coroutine
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: asyncio.Task[Any] | None = None

    def settle(self, task: asyncio.Task[Any]) -> None:
        """The task's outcome, for the waiting thread (as run_coroutine_threadsafe gives it)."""
        if task.cancelled():
            self.future.cancel()
        if not self.future.set_running_or_notify_cancel():  # (cancelled: given up, or the task was)
            return
        if (error := task.exception()) is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(task.result())


def _interruption(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C that `error`, a RuntimeError, was raised over, if any. A KeyboardInterrupt that
    lands in `threading.Condition.wait` as it takes its lock back leaves the `with` around the
    wait releasing a lock it does not hold: "RuntimeError: release unlocked lock" is raised, the
    interrupt its `__context__` (CI: a Ctrl-C in a stream's wait surfaced so, and an application's
    `except KeyboardInterrupt` never ran)."""
    if not isinstance(error, RuntimeError):
        return None
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:  # (the chain, cause or context, without cycles)
        if isinstance(link, KeyboardInterrupt):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _is_outcome(future: concurrent.futures.Future[Any], error: BaseException) -> bool:
    """Whether `error` is the call's own outcome (raised on the loop), not what met the wait."""
    return future.done() and not future.cancelled() and future.exception(timeout=0) is error


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and let it end, for up to UNWIND_S (CI saw 0.5 s too short under load: the
    call still in flight after the interruption). Cancelled once more if it has not ended
    halfway: on Python 3.11 a cancellation that meets a result (nats-py's requests,
    asyncio.wait_for) can be lost. Not more often: each cancellation would cut its clean-up
    short (a stream's unsubscribing)."""
    for _ in range(2):
        task.cancel()
        await asyncio.wait({task}, timeout=UNWIND_S / 2)
        if task.done():
            return


class SyncHandle:
    """The blocking form of `ExecutionHandle`."""

    def __init__(self, owner: SyncClient, handle: ExecutionHandle) -> None:
        self._owner = owner
        self.handle = handle
        self.id = handle.id

    def status(self, include_logs: bool = False) -> Execution:
        """The execution's status."""
        return self._owner._call(self.handle.status(include_logs))

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the execution's end: its result, or its error raised."""
        return self._owner._call(self.handle.result(timeout))

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the execution's end: its ExecutionResult, whatever the status (see
        ExecutionHandle.wait)."""
        return self._owner._call(self.handle.wait(timeout))

    def cancel(self, reason: str = "", force: bool = False) -> str:
        """Cancel the execution; its status after the request."""
        return self._owner._call(self.handle.cancel(reason, force))

    def events(self, after_seq: int = 0, idle_s: float = 15.0) -> Iterator[Any]:
        """The execution's events as they are stored, until the terminal one (see
        ExecutionHandle.events)."""
        return self._owner._iterate(self.handle.events(after_seq, idle_s))

    def chunks(self) -> Iterator[Any]:
        """A STREAM execution's items as they are stored (see ExecutionHandle.chunks)."""
        return self._owner._iterate(self.handle.chunks())
