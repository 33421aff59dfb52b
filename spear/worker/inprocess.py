"""Run a Python function in the worker process: bind parameters by name, keep the loop free.

Coroutine functions run on the event loop; plain ones in a thread pool, so a CPU-bound or
blocking function never stalls the worker's acks and appends.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from spear.worker.context import Context, InvalidArgument


async def run_function(
    fn: Callable[..., Any], parameters: dict[str, Any], ctx: Context, executor: Executor | None = None
) -> Any:
    kwargs = _bind(fn, parameters, ctx)
    if inspect.iscoroutinefunction(fn):
        return await fn(**kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, **kwargs))


def _bind(fn: Callable[..., Any], parameters: dict[str, Any], ctx: Context) -> dict[str, Any]:
    signature = inspect.signature(fn)
    kwargs = dict(parameters)
    if "ctx" in signature.parameters:
        if "ctx" in kwargs:
            raise InvalidArgument("parameter name 'ctx' is reserved")
        kwargs["ctx"] = ctx
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise InvalidArgument(f"parameters do not fit {fn.__name__}{_public(signature)}: {exc}") from None
    return kwargs


def _public(signature: inspect.Signature) -> str:
    return str(signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "ctx"]))
