"""A user's own task, as a module the tests serve (in-process, and with `--task tests.own_tasks:own`)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import spear

own = spear.Task("own", name="own functions", description="the tests' own task")


@own.function
def add(a: int, b: int = 0) -> int:
    """a + b."""
    return a + b


@own.function(name="anything")
def takes_anything(first: str, **rest: Any) -> dict[str, Any]:
    return {"first": first, **rest}


@own.function(timeout_ms=300, max_retries=2)
async def slow(ms: int) -> int:
    await asyncio.sleep(ms / 1000)
    return ms


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
