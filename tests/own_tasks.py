"""A user's own task, as a module the tests serve (in-process, and with `--task tests.own_tasks:own`)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import msgspec

import spear

own = spear.Task("own", name="own functions", description="the tests' own task")


@own.function
def add(a: int, b: int = 0) -> int:
    """a + b."""
    return a + b


@dataclasses.dataclass
class Line:
    sku: str
    qty: Annotated[int, msgspec.Meta(ge=1)] = 1


class Speed(enum.Enum):
    SLOW = "slow"
    FAST = "fast"


@own.function(max_retries=2)
def order(
    lines: list[Line],
    speed: Speed = Speed.SLOW,
    when: datetime.datetime | None = None,
    note: str = None,  # type: ignore[assignment]  # noqa: RUF013 (the idiom a None default is taken with)
) -> Any:
    """Annotated parameters: the worker builds what they say from the call's JSON."""
    return {
        "lines": [type(line).__name__ for line in lines],
        "items": sum(line.qty for line in lines),
        "speed": speed.name,
        "when": when.year if when else None,
        "note": note,
    }


@own.function(inline=True)
def halve(n: float) -> float:
    """Inline (the quick path): its parameter is taken as a float."""
    return n / 2


@own.function(name="anything")
def takes_anything(first: str, **rest: Any) -> dict[str, Any]:
    return {"first": first, **rest}


@own.function(name="anything_with_context")
def takes_anything_with_its_context(ctx: spear.Context, **rest: Any) -> dict[str, Any]:
    return {"attempt": ctx.attempt, **rest}


@own.function(timeout_ms=300, max_retries=2)
async def slow(ms: int) -> int:
    await asyncio.sleep(ms / 1000)
    return ms


@own.function(timeout_ms=200, max_retries=0)
async def blocks(ms: int) -> int:
    """A coroutine that blocks its loop past its time limit: nothing can stop it there."""
    time.sleep(ms / 1000)  # noqa: ASYNC251  (the mistake this function stands for)
    return ms


@own.function(timeout_ms=300, max_retries=0)
async def returns_before_a_busy_loop(ms: int) -> int:
    """Returns at once, leaving its loop busy for `ms` (as other work on a worker's loop may)."""
    asyncio.get_running_loop().call_soon(time.sleep, ms / 1000)
    return ms


@own.function(timeout_ms=200, max_retries=0, inline=True)
def overruns_inline(ms: int) -> int:
    """An inline function that runs past its time limit: nothing can stop it there."""
    time.sleep(ms / 1000)
    return ms


@own.function
def interleaved(ctx: spear.Context, rounds: int = 1) -> int:
    """Progress reports and log lines, interleaved, as fast as they can be made."""
    for _ in range(rounds):
        ctx.progress(0.25, "p1")
        ctx.log("l1")
        ctx.progress(0.5, "p2")
        ctx.progress(0.75, "p3")
        ctx.log("l2")
        ctx.progress(1.0, "p4")
    return rounds


def _ending(how: str) -> BaseException:
    """What ends a program (or a task) by `how`: "interrupt", "exit" or "cancel" (raised with no
    one asking: probe41)."""
    return {"interrupt": KeyboardInterrupt, "exit": SystemExit, "cancel": asyncio.CancelledError}[how](how)


@own.function(max_retries=0)
def exits(how: str) -> None:
    """Raises what ends a program, in a worker's thread: only this execution fails."""
    raise _ending(how)


@own.function(max_retries=0)
async def exits_async(how: str) -> None:
    """The same on the worker's event loop."""
    raise _ending(how)


class Unprintable(Exception):
    """An exception whose message cannot be read: its `str()` raises."""

    def __str__(self) -> str:
        raise RuntimeError("not today")


@own.function(max_retries=0)
def raises_unprintable() -> None:
    raise Unprintable()


@own.function(max_retries=0)
def raises_no_message() -> None:
    raise RuntimeError()


@own.function(max_retries=0, inline=True)
def raises_no_message_inline() -> None:
    raise RuntimeError()


@own.function(max_retries=0)
async def raises_no_message_async() -> None:
    raise RuntimeError()


@own.function(max_retries=0)
def first_item(items: list[Any]) -> Any:
    """`next()` of an empty list raises StopIteration, in a thread (probe28: the attempt hung)."""
    return next(iter(items))


@own.function(max_retries=0, inline=True)
def first_item_inline(items: list[Any]) -> Any:
    return next(iter(items))


@own.function(inline=True)
def notes_inline(marks: str) -> int:
    """An inline function that notes each run in the file `marks` (run from the read loop)."""
    with open(marks, "a") as file:
        file.write("ran\n")
    return 1


@own.function(max_retries=0)
async def first_item_async(items: list[Any]) -> Any:
    return next(iter(items))


@own.function(max_retries=0)
def raises_at_length(chars: int) -> None:
    raise ValueError("x" * chars)


@own.function
def notes_each_run(marks: str) -> int:
    """Notes each run in the file `marks` (a side effect a test counts); returns how many so far."""
    with open(marks, "a") as file:
        file.write("ran\n")
    with open(marks) as file:
        return len(file.readlines())


@own.function(max_retries=0)
async def notes_then_sleeps(marks: str, ms: int) -> int:
    """Notes its run in the file `marks`, then sleeps `ms`."""
    with open(marks, "a") as file:  # noqa: ASYNC230 - a line to a local file, once
        file.write("ran\n")
    await asyncio.sleep(ms / 1000)
    return ms


@own.function(max_retries=1)
def takes_its_worker_down(marks: str) -> None:
    """Notes each run in the file `marks`, then ends its worker's process at once (before the
    worker would store `started` for a quick attempt)."""
    with open(marks, "a") as file:
        file.write("ran\n")
    os._exit(1)


@own.function(max_retries=1)
def progress_then_retry(ctx: spear.Context, ms: int = 3000) -> int:
    """Attempt 1 reports 90% and fails; attempt 2 reports 20%, then runs `ms` and returns."""
    if ctx.attempt == 1:
        ctx.progress(0.9, "attempt 1 almost done")
        time.sleep(0.3)
        raise RuntimeError("attempt 1 fails late")
    ctx.progress(0.2, "attempt 2 begins")
    ctx.wait_cancelled(ms / 1000)
    return ctx.attempt


@own.function
def about(context: spear.Context, note: str = "") -> dict[str, Any]:
    """Reports what its context says (annotated, under another name than ctx)."""
    context.log(f"note: {note}")
    context.progress(0.5, "half way")
    return {
        "execution_id": context.execution_id,
        "task_id": context.task_id,
        "function_name": context.function_name,
        "attempt": context.attempt,
        "seconds_left": context.remaining_s,
        "deadline": context.deadline,
        "cancelled": context.cancelled,
        "pid": os.getpid(),
    }


@own.function
def chatty(ctx: spear.Context, lines: int, width: int = 10) -> int:
    for i in range(lines):
        ctx.log(f"{i}:" + "x" * width)
    return lines


# --- streaming functions ----------------------------------------------------------------------------


@own.function
def fast_stream(n: int) -> Iterator[int]:
    """Yields 0..n-1 as fast as it can: far faster than appends complete."""
    yield from range(n)


@own.function
async def async_stream(n: int, delay_ms: int = 0) -> AsyncIterator[dict[str, int]]:
    for i in range(n):
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        yield {"i": i}


@own.function(max_retries=1)
def flaky_stream(ctx: spear.Context) -> Iterator[str]:
    """Attempt 1 yields three chunks and fails; attempt 2 yields two and ends."""
    for i in range(3 if ctx.attempt == 1 else 2):
        yield f"a{ctx.attempt}-{i}"
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt breaks after three chunks")


@own.function(max_retries=1)
def stale_then_empty(ctx: spear.Context) -> Iterator[str]:
    """Attempt 1 yields two chunks and fails; attempt 2 yields nothing and ends."""
    if ctx.attempt == 1:
        yield "stale-0"
        yield "stale-1"
        raise RuntimeError("the first attempt breaks after two chunks")


@own.function(max_retries=0)
def item_not_json(at: int) -> Iterator[float]:
    """Yields `at` numbers as fast as it can (the worker's loop queues them behind), then inf."""
    yield from (float(n) for n in range(at))
    yield float("inf")
    yield 0.0


@own.function
def sized_stream(items: int, kib: int) -> Iterator[str]:
    for _ in range(items):
        yield "x" * (kib * 1024)


@own.function
def big_chunk(megabytes: int) -> Iterator[str]:
    yield "small first"
    yield "x" * (megabytes * 1024 * 1024)


# --- a second task, for a worker that serves several ------------------------------------------------

other = spear.Task("other", description="a second task of plain functions")


@other.function
def double(n: int) -> int:
    """A plain function: it runs in one of the worker's threads."""
    return 2 * n


# --- killable isolation (a task of its own: serving it starts a child process) ------------------------

DEAF_RELEASE = threading.Event()  # set by a test: every `deaf` call returns


@own.function
def deaf(seconds: float = 60.0) -> str:
    """Runs in a thread and does not watch ctx.cancelled: it goes on past its time limit (Python
    cannot stop a thread) until it is released or its time is up."""
    DEAF_RELEASE.wait(seconds)
    return "returned"


isolated = spear.Task("isolated", description="functions that run in child processes")


@isolated.function(isolation="process")
def spin(ctx: spear.Context, seconds: float = 60.0) -> int:
    """CPU-bound and deaf to cancellation: only killing its process stops it."""
    ctx.log(f"pid {os.getpid()}")
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        count += 1
    return count


@isolated.function(isolation="process")
def in_a_process(ctx: spear.Context, n: int) -> Iterator[dict[str, Any]]:
    """A streaming function in a child process, reporting progress and watching ctx.cancelled."""
    for i in range(n):
        ctx.progress((i + 1) / n, f"item {i}")
        yield {"i": i, "pid": os.getpid(), "attempt": ctx.attempt}
    if n < 0:
        raise spear.NonRetryableError("never")


def _read_config(name: str) -> dict[str, Any]:
    return {"known": 1}[name]  # (a KeyError two frames down)


@own.function
def spear_settings_seen() -> list[str]:
    """The names of the `SPEAR_*` variables the worker's environment has (code of a registered
    Python artifact sees the same)."""
    return sorted(name for name in os.environ if name.startswith("SPEAR_"))


@own.function(max_retries=0)
def fails_with_a_cause(name: str) -> None:
    """Raises an error chained to the KeyError under it."""
    try:
        _read_config(name)
    except KeyError as exc:
        raise RuntimeError(f"no setting {name}") from exc


@own.function(max_retries=0)
def fails_with_a_dsn() -> None:
    """A failure whose cause names a URL with a password in it."""
    try:
        raise ConnectionError("cannot reach postgresql://app:hunter2@db:5432/orders")
    except ConnectionError as exc:
        raise RuntimeError("the database is down") from exc


@isolated.function(isolation="process", max_retries=0)
def fails_with_a_cause_in_a_process(name: str) -> None:
    """As `fails_with_a_cause`, in a child process."""
    try:
        _read_config(name)
    except KeyError as exc:
        raise RuntimeError(f"no setting {name}") from exc


@isolated.function(isolation="process")
def spear_variables() -> list[str]:
    """The names of the `SPEAR_*` variables its process has."""
    return sorted(name for name in os.environ if name.startswith("SPEAR_"))


@isolated.function(isolation="process")
def fails_in_a_process(message: str) -> None:
    raise spear.NonRetryableError(message)


@isolated.function(isolation="process", max_retries=0)
def raises_its_own(message: str) -> None:
    """Raises an exception of a class made in the call: nothing can pickle it."""

    class OwnError(Exception):
        pass

    raise OwnError(message)


class NeedsTwo(Exception):
    """Pickles, but does not unpickle: its `__init__` takes more than the args it keeps."""

    def __init__(self, message: str, more: str) -> None:
        super().__init__(message)
        self.more = more


@isolated.function(isolation="process", max_retries=0)
def raises_needs_two(message: str) -> None:
    raise NeedsTwo(message, "more")


class BadInputNeedsTwo(spear.InvalidArgument):
    """spear's INVALID_ARGUMENT, unpicklable as NeedsTwo is."""

    def __init__(self, message: str, more: str) -> None:
        super().__init__(message)
        self.more = more


class StopsNeedsTwo(spear.ExecutionCancelled):
    """A stop on request (CANCELLED), unpicklable as NeedsTwo is."""

    def __init__(self, message: str, more: str) -> None:
        super().__init__(message)
        self.more = more


@isolated.function(isolation="process")
def raises_a_kind_that_needs_two(kind: str, message: str) -> None:
    raise (BadInputNeedsTwo if kind == "invalid" else StopsNeedsTwo)(message, "more")


@isolated.function(isolation="process", max_retries=0)
def returns_what_cannot_be_sent(what: str) -> Any:
    """Returns a value its process cannot pickle back: nested too deep, or a function."""
    if what == "deep":
        value: list[Any] = []
        for _ in range(2000):
            value = [value]
        return value
    return lambda: None


@isolated.function(isolation="process", max_retries=0)
def exits_in_a_process(how: str) -> None:
    """Raises what ends a program, in the worker's child process: only this execution fails."""
    raise _ending(how)


@isolated.function(isolation="process")
def starts_a_program(path: str) -> None:
    """Starts a program (`sleep`, in its process's group) and waits; writes both pids to `path`."""
    program = subprocess.Popen(["sleep", "300"])
    with open(path + ".tmp", "w") as pids:
        pids.write(f"{os.getpid()} {program.pid}")
    os.replace(path + ".tmp", path)
    time.sleep(300)


@isolated.function(isolation="process")
def patient(ctx: spear.Context) -> None:
    """Waits, in its process, until cancellation is asked for, then stops cooperatively."""
    ctx.log(f"pid {os.getpid()}")
    while not ctx.wait_cancelled(0.01):
        pass
    raise spear.ExecutionCancelled("stopped on request")
