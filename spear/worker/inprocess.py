"""Run a Python function in the worker process: bind parameters by name, keep the loop free.

Coroutine functions run on the event loop; plain ones in a thread pool, so a CPU-bound or
blocking function never stalls the worker's acks and appends.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from concurrent.futures import Executor
from typing import Any

from spear.worker.context import Context, InvalidArgument
from spear.worker.tasks import Function


async def run_function(
    function: Function, parameters: dict[str, Any], ctx: Context, executor: Executor | None = None
) -> Any:
    kwargs = bind(function, parameters, ctx)
    if function.is_coroutine:
        return await function.fn(**kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(function.fn, **kwargs))


def bind(function: Function, parameters: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The keyword arguments of a call: the parameters, and the Context where the function takes it."""
    kwargs = dict(parameters)
    name = function.context_parameter
    if name is not None:
        if name in kwargs:
            raise InvalidArgument(f"parameter name {name!r} is reserved for the context")
        kwargs[name] = ctx
    signature = inspect.signature(function.fn)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        public = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != name])
        raise InvalidArgument(f"parameters do not fit {function.name}{public}: {exc}") from None
    return kwargs
