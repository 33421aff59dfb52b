"""Killable isolation: plain functions with `isolation="process"` run in worker-owned child
processes, so a timed-out or force-cancelled one is really stopped (its process is killed and
replaced) instead of burning a thread that Python cannot kill.

Each child runs one call at a time and is reused. The parent sends the call (the function by
module and qualified name, the parameters, the context's fields) down one pipe; the child sends
back, on another, the function's log lines and progress, a streaming function's items, and then
its result or exception (pickled: the parent re-raises the same exception type, so errors read as
they do in a thread). A cooperative cancel is forwarded to the child's `ctx.cancelled`.

Children are fresh interpreters (never `fork`: the worker has threads and an event loop), started
with `python -c` rather than multiprocessing's spawn, so they do not re-import the worker's main
module (no `if __name__ == "__main__"` needed in a user's script, and a quick start). They get
the worker's `sys.path` (so the current directory and the task's modules import), ignore Ctrl-C
(the worker stops them), and exit by themselves when the worker disappears. Each runs in a session
and process group of its own, killed whole when the child is (what a function started goes with
it), and by the worker's reaper if the worker dies at once (reaper.py): a child busy in native code
does not see its pipe end, and what it started would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Protocol

from spear import artifacts
from spear.core.jsonlimits import exception_text
from spear.environment import for_programs
from spear.interpreter import PYTHON
from spear.worker.context import (
    Context,
    ExecutionCancelled,
    InvalidArgument,
    NonRetryableError,
    ReportedFailure,
    ResultNotSerializable,
    StreamedItems,
)
from spear.worker.failures import carry_traceback
from spear.worker.paramtypes import ParameterTypes
from spear.worker.reaper import reaper

log = logging.getLogger(__name__)

# A child's functions' parameter types, by (module, qualified name, Context parameter): read once
_PARAMETER_TYPES: dict[tuple[str, str, str | None], ParameterTypes | None] = {}


class ChunkSink(Protocol):
    """Where the items a function yields go (the attempt's appends)."""

    async def chunk(self, item: Any) -> None:
        """Store one item."""


class ChildExited(RuntimeError):
    """The function's process ended without answering (it crashed or exited)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Child:
    """One child process and its two pipes."""

    def __init__(self, process: subprocess.Popen[bytes], jobs: Connection, events: Connection):
        self.process = process
        self.jobs = jobs  # parent -> child: calls and cancels
        self.events = events  # child -> parent: reports, chunks, the outcome
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.jobs.send(message)

    def cancel(self, job: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # it may be gone already
            self.send(("cancel", job))

    def wait(self, timeout: float) -> int | None:
        """Reap the process (at most `timeout` seconds); its exit code, or None if it still runs."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        return self.process.returncode


class ProcessPool:
    """Worker-owned child processes that run plain functions, killed on timeout or forced cancel."""

    def __init__(self, size: int):
        self.size = size
        self._idle: list[_Child] = []
        self._live = 0  # children started and not yet reaped
        self._slots = asyncio.Semaphore(size)
        self._readers = ThreadPoolExecutor(size + 1, thread_name_prefix="spear-proc")
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    async def warm(self) -> None:
        """Start one child ahead of the first call (starting one takes a fraction of a second)."""
        if not self._idle:
            self._idle.append(await self._start())

    async def run(
        self,
        fn: Callable[..., Any],
        kwargs: dict[str, Any],
        context_parameter: str | None,
        ctx: Context,
        streaming: bool,
        sink: ChunkSink | None,
    ) -> Any:
        """Call `fn(**kwargs)` in a child (the Context passed as `context_parameter`). Cancelling
        this coroutine kills the child."""
        async with self._slots:
            child = await self._idle_or_new()
            job = f"{ctx.execution_id}:{ctx.attempt}"
            fields = {name: getattr(ctx, name) for name in _CONTEXT_FIELDS}
            loaded = sys.modules.get(fn.__module__)
            # A registered artifact's module: its file's name and the verified bytes it ran, which
            # the child runs too (never the file as it may be by then); the path: roots added since.
            source = getattr(loaded, artifacts.SOURCE_ATTRIBUTE, None)
            package = getattr(loaded, "__package__", None) or ""
            module = (fn.__module__, getattr(loaded, "__file__", None), source, list(sys.path), package)
            # (with what this worker's results carry: a child keeps a stream's items up to it, review29)
            kept = StreamedItems.limit
            call = ("run", job, module, fn.__qualname__, kwargs, context_parameter, fields, streaming, kept)
            ctx.on_cancel = functools.partial(child.cancel, job)
            answered = False
            try:
                try:
                    child.send(call)
                except OSError:  # it died since the look above (review46): say how, as `_receive` does
                    code = await asyncio.get_running_loop().run_in_executor(self._readers, child.wait, 5)
                    raise ChildExited(f"the function's process exited with code {code}", code) from None
                while True:
                    kind, *payload = await self._receive(child)
                    if kind == "report" and ctx.on_report is not None:
                        ctx.on_report(payload[0], payload[1])
                    elif kind == "chunk" and sink is not None:
                        await sink.chunk(payload[0])
                    elif kind in ("result", "error"):
                        answered = True
                        self._idle.append(child)
                        if kind == "error":
                            raise payload[0]
                        return payload[0]
            finally:
                ctx.on_cancel = None
                if not answered:  # timed out, force-cancelled, the stream refused, or it died
                    self._kill(child)

    async def _idle_or_new(self) -> _Child:
        """An idle child still alive, or a new one. An idle child may have died meanwhile (a stop
        signal sent to every process of the service at once: review46, its next call failed with
        a broken pipe): it is reaped and passed over."""
        while self._idle:
            child = self._idle.pop()
            if child.process.poll() is None:
                return child
            self._kill(child)  # (reaps it; its replacement, if any, comes in the background)
        return await self._start()

    async def _receive(self, child: _Child) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = await asyncio.get_running_loop().run_in_executor(
                self._readers, child.events.recv
            )
            return message
        except (EOFError, OSError):
            code = await asyncio.get_running_loop().run_in_executor(self._readers, child.wait, 5)
            raise ChildExited(f"the function's process exited with code {code}", code) from None

    async def _start(self) -> _Child:
        jobs_read, jobs_write = os.pipe()
        events_read, events_write = os.pipe()
        command = [*PYTHON, "-c", _BOOT, json.dumps(sys.path), str(jobs_read), str(events_write)]
        loop = asyncio.get_running_loop()

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                command,
                pass_fds=(jobs_read, events_write),
                stdin=subprocess.DEVNULL,
                env=for_programs(),
                start_new_session=True,  # its own process group: killed whole
            )

        try:
            process = await loop.run_in_executor(self._readers, spawn)
        finally:
            os.close(jobs_read)  # the child's ends
            os.close(events_write)
        reaper.watch(process.pid)
        self._live += 1
        child = _Child(process, Connection(jobs_write, readable=False), Connection(events_read, writable=False))
        try:
            ready = await self._receive(child)
            if ready[0] != "ready":
                raise ChildExited(f"the function's process said {ready[0]!r} instead of ready")
        except BaseException:  # (or cancelled as it starts: a call's time limit) not left listed
            _kill_group(child)
            reaper.forget(process.pid)
            raise
        return child

    def _kill(self, child: _Child) -> None:
        """Stop the child's CPU now, and what it started; reap it and start a replacement in the
        background."""
        _kill_group(child)
        task = asyncio.get_running_loop().create_task(self._reap_and_replace(child))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap_and_replace(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._readers, child.wait, 10)
        reaper.forget(child.process.pid)
        for connection in (child.jobs, child.events):
            connection.close()
        self._live -= 1
        if not self._closed and not self._idle:
            try:
                self._idle.append(await self._start())
            except Exception as exc:  # the next call starts one itself
                log.warning("worker: no replacement process started: %s", exc)

    def wind_down(self) -> None:
        """The worker stops: a child that ends is not replaced (probe45: one started as the
        worker handed its attempts back, and exited at once with half a traceback)."""
        self._closed = True

    async def close(self) -> None:
        """Stop idle children and kill busy ones (their attempts were abandoned already)."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for child in self._idle:
            with contextlib.suppress(Exception):
                child.send(("stop",))
        loop = asyncio.get_running_loop()
        for child in self._idle:
            await loop.run_in_executor(self._readers, child.wait, 2)
            _kill_group(child)  # (what it started; itself too, if it did not stop)
            reaper.forget(child.process.pid)
        self._idle.clear()
        self._readers.shutdown(wait=False, cancel_futures=True)


def _kill_group(child: _Child) -> None:
    """SIGKILL the child's process group: the child and what it started there (unless the child
    is reaped and its id taken since by a process started after it was listed: review62)."""
    if child.process.poll() is not None and reaper.taken(child.process.pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, signal.SIGKILL)


_CONTEXT_FIELDS = ("execution_id", "task_id", "function_name", "attempt", "deadline")


# --- the child -------------------------------------------------------------------------------------


# spear first, from where the interpreter finds it (`-P`: not the working directory), then the
# worker's import path for the functions' modules (review49: a `spear` folder in the working
# directory, first on the worker's path, was imported instead of spear).
_BOOT = (
    "import json, sys; from spear.worker.isolation import child_main; "
    "sys.path[:] = json.loads(sys.argv[1]); child_main(int(sys.argv[2]), int(sys.argv[3]))"
)


def child_main(jobs_fd: int, events_fd: int) -> None:
    """The child's loop: one call at a time from the worker, until it says stop or goes away."""
    jobs = Connection(jobs_fd, writable=False)
    events = Connection(events_fd, readable=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which stops us
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            events.send(message)

    calls: queue.Queue[tuple[Any, ...]] = queue.Queue()
    current: dict[str, Context] = {}

    def read() -> None:  # the only reader of `jobs`: calls go to the main thread, cancels apply at once
        while True:
            try:
                message = jobs.recv()
            except (EOFError, OSError):
                os._exit(0)  # the worker is gone: so are we, even in the middle of a call
            except Exception as exc:  # a call this process cannot read: answered so, not a reader gone
                # (review53: one naming a class that was not importable here killed this thread;
                # its call waited till its time limit, every attempt)
                calls.put(("unreadable", exception_text(exc)))
                continue
            if message[0] == "cancel":
                ctx = current.get(message[1])
                if ctx is not None:
                    ctx.cancel()
            else:
                calls.put(message)

    threading.Thread(target=read, name="spear-child-reader", daemon=True).start()
    send(("ready",))
    while True:
        message = calls.get()
        if message[0] == "stop":
            return
        if message[0] == "unreadable":
            send(("error", ReportedFailure(f"the call cannot be read in its process: {message[1]}", retryable=False)))
            continue
        _, job, module, qualname, kwargs, context_parameter, fields, streaming, StreamedItems.limit = message
        ctx = Context(**fields)
        ctx.on_report = lambda progress, text: send(("report", progress, text))
        current[job] = ctx
        try:
            outcome: tuple[Any, ...] = (
                "result",
                _call(module, qualname, kwargs, context_parameter, ctx, streaming, send),
            )
        except BaseException as exc:
            sent = _sent_back_as_is(exc)
            carry_traceback(exc, sent)  # (formatted here, where its frames are: failures.py)
            outcome = ("error", sent)
        finally:
            current.pop(job, None)
        _send_outcome(send, outcome)


def _send_outcome(send: Callable[[tuple[Any, ...]], None], outcome: tuple[Any, ...]) -> None:
    """A call's outcome to the worker; one that does not pickle said in a form that does."""
    try:
        send(outcome)
    except Exception as exc:  # not picklable: say so in a form that is, with what was raised (probe28)
        if outcome[0] == "result":  # (as a thread's value JSON cannot hold: probe29 saw FUNCTION_ERROR)
            said = f"the result cannot be sent back from its process: {exception_text(exc)}"
            send(("error", ResultNotSerializable(said)))
        else:
            said = exception_text(outcome[1])
            send(("error", RuntimeError(f"{said}; the outcome cannot be sent back: {exception_text(exc)}")))


def _sent_back_as_is(exc: BaseException) -> BaseException:
    """`exc` if the worker can read it back as it is; else the failure it makes, said as a thread's
    would be ("TwoArgs: a/b": probe41 saw "RuntimeError: TwoArgs: a/b; TypeError: …" where the
    same function run in a thread said "TwoArgs: a/b"), retried as it would be. One that pickles
    but does not unpickle (its `__init__` takes other arguments than it keeps) made the worker's
    read fail: the call failed with that TypeError, not the function's own (review22)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception as error:
        log.debug("a function's %s cannot be sent back as it is (%s): sent as its text", type(exc).__name__, error)
        # the kinds spear tells apart by class come back as that class, with the same text
        for kind in (InvalidArgument, ExecutionCancelled, ResultNotSerializable):
            if isinstance(exc, kind):
                return kind(_text(exc))
        return ReportedFailure(exception_text(exc), retryable=not isinstance(exc, NonRetryableError))
    return exc


def _text(exc: BaseException) -> str:
    """`str(exc)`, or what exception_text makes of one whose `str()` raises."""
    try:
        return str(exc)
    except Exception:
        return exception_text(exc)


def _call(
    module: tuple[str, str | None, bytes | None, list[str], str],
    qualname: str,
    kwargs: dict[str, Any],
    context_parameter: str | None,
    ctx: Context,
    streaming: bool,
    send: Callable[[tuple[Any, ...]], None],
) -> Any:
    from spear.worker.inprocess import drain

    fn: Any = _module(*module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    key = (module[0], qualname, context_parameter)
    if key not in _PARAMETER_TYPES:
        _PARAMETER_TYPES[key] = ParameterTypes.of(fn, context_parameter)
    types = _PARAMETER_TYPES[key]
    if types is not None:  # (the worker checked them already: this builds them, here)
        try:
            kwargs.update(types.convert(kwargs))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    if context_parameter is not None:
        kwargs[context_parameter] = ctx
    if streaming:
        return drain(functools.partial(fn, **kwargs), ctx, lambda item: send(("chunk", item)))
    return fn(**kwargs)


def _module(name: str, origin: str | None, source: bytes | None, path: list[str], package: str = "") -> Any:
    """The function's module: imported by name, or, for a task registered at runtime (loaded by the
    worker under a name of its own, which no import finds), made from the bytes the worker checked
    and ran (`source`), with the worker's `sys.path` (its artifact roots, for the file's imports)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        if source is None or name in sys.modules:
            raise
    sys.path.extend(entry for entry in path if entry not in sys.path)
    return artifacts.module_from_source(name, source, origin or name, package)
