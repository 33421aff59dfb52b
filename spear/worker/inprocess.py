"""Run a Python function in the worker process: bind parameters by name, keep the loop free.

Coroutine functions run on the event loop; plain ones in a thread pool, so a CPU-bound or
blocking function never stalls the worker's acks and appends, unless declared `inline` (quick:
called on the loop, no thread hop). Generators (streaming functions)
hand each item to the attempt's appends as a chunk; their result is the generator's return
value, or else the list of items. A generator stops at its next item once the attempt is
cancelled or timed out, so even one running in a thread does not run on for long.
The call is the function's own span (a child of the attempt's), current in its thread too, with
spear's log context.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from opentelemetry.trace import Span, SpanKind

from spear.telemetry import tracing
from spear.worker.context import Context, ExecutionCancelled, InvalidArgument, StreamedItems
from spear.worker.isolation import ProcessPool
from spear.worker.tasks import Function
from spear.worker.threads import FunctionThreads, carried_out


class ChunkSink(Protocol):
    """Where a streaming function's items go (`AttemptAppends`)."""

    def chunk_from_thread(self, item: Any) -> None:
        """Store an item a function running in a thread yielded."""

    async def chunk(self, item: Any) -> None:
        """Store an item a coroutine function yielded."""


async def run_function(
    function: Function,
    parameters: dict[str, Any],
    ctx: Context,
    executor: FunctionThreads | None = None,
    sink: ChunkSink | None = None,
    processes: ProcessPool | None = None,
    stream: bool = False,
) -> Any:
    """Call the function (its own span); a plain one in a child process of `processes` when given.
    (An inline function is called with `run_inline`, without a coroutine.)"""
    if not tracing.may_record():  # nothing would record the function's span: the attempt's stays current
        return await _call(function, parameters, ctx, executor, sink, processes, stream)
    with _span(function, ctx):
        return await _call(function, parameters, ctx, executor, sink, processes, stream)


def run_inline(function: Function, parameters: dict[str, Any], ctx: Context) -> Any:
    """Call an inline function (a quick plain one) here, on the worker's loop, in its own span.
    Not in a coroutine: a StopIteration it raises stays one (a coroutine makes it a RuntimeError),
    and the quick path, which has no coroutine, gets the same."""
    if not tracing.may_record():
        return function.fn(**bind(function, parameters, ctx))
    with _span(function, ctx):
        return function.fn(**bind(function, parameters, ctx))


def _span(function: Function, ctx: Context) -> AbstractContextManager[Span]:
    attributes = {
        "code.function.name": getattr(function.fn, "__qualname__", repr(function.fn)),
        "spear.attempt": ctx.attempt,
    }
    return tracing.span(f"function {ctx.task_id}.{ctx.function_name}", SpanKind.INTERNAL, None, attributes)


async def _call(
    function: Function,
    parameters: dict[str, Any],
    ctx: Context,
    executor: FunctionThreads | None,
    sink: ChunkSink | None,
    processes: ProcessPool | None,
    stream: bool,
) -> Any:
    if function.native is not None:  # spear runs it itself (a process artifact): no binding
        return await function.native(parameters, ctx, sink, stream)
    kwargs = bind(function, parameters, ctx)
    if processes is not None:
        # The call's values as they came (checked above): the child takes them at their types once
        # it has the function's module (review53: a class of a registered artifact, pickled from
        # here, could not be unpickled before; the child hung till the time limit). Its own Context.
        return await processes.run(
            function.fn, dict(parameters), function.context_parameter, ctx, function.streaming, sink
        )
    if function.is_async_generator:
        return await _drain_async(function.fn(**kwargs), ctx, sink)
    if function.is_coroutine:
        return await function.fn(**kwargs)
    call: Callable[[], Any] = functools.partial(function.fn, **kwargs)
    if function.streaming:
        call = functools.partial(drain, call, ctx, sink.chunk_from_thread if sink else None)
    # A thread does not inherit context variables: hand it this task's (span, log fields).
    call = functools.partial(contextvars.copy_context().run, call)
    if executor is None:  # (the gateway runs only inline functions: none comes here)
        return await asyncio.get_running_loop().run_in_executor(None, carried_out, call)
    return await executor.run(call, f"{ctx.task_id}.{ctx.function_name} of execution {ctx.execution_id}")


def drain(start: Callable[[], Generator[Any, Any, Any]], ctx: Context, put: Callable[[Any], None] | None) -> Any:
    """Run a generator to its end (in a thread, or a child process), handing on each item."""
    generator = start()
    items = StreamedItems()
    try:
        while True:
            if ctx.cancelled:
                raise ExecutionCancelled(f"execution {ctx.execution_id} was cancelled")
            try:
                item = next(generator)
            except StopIteration as stop:
                return stop.value if stop.value is not None else items
            if put is not None:
                put(item)
            items.keep(item)
    finally:
        generator.close()


async def _drain_async(generator: AsyncIterator[Any], ctx: Context, sink: ChunkSink | None) -> list[Any]:
    """An async generator cannot return a value: its result is the list of its items."""
    items = StreamedItems()
    try:
        async for item in generator:
            if sink is not None:
                await sink.chunk(item)
            items.keep(item)
            if ctx.cancelled:
                raise ExecutionCancelled(f"execution {ctx.execution_id} was cancelled")
    finally:
        await generator.aclose()  # type: ignore[attr-defined]
    return items


def bind(function: Function, parameters: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The keyword arguments of a call: the parameters, and the Context where the function takes it."""
    kwargs = dict(parameters)
    name = function.context_parameter
    if name is not None:
        if name in kwargs:
            raise InvalidArgument(f"parameter name {name!r} is reserved for the context")
        kwargs[name] = ctx
    if not function.by_name.fits(parameters.keys()):
        try:
            inspect.signature(function.fn).bind(**kwargs)  # only to say what does not fit
        except TypeError as exc:
            raise InvalidArgument(f"parameters do not fit {function.call_form}: {exc}") from None
    types = function.parameter_types
    if types is not None:
        try:
            kwargs.update(types.convert(parameters))
        except ValueError as exc:
            raise InvalidArgument(f"parameters do not fit {function.call_form}: {exc}") from None
    return kwargs
