"""The bundled `demo` task (CONTRACT §7): the seed documents' examples plus a few that make
spear's behaviour visible (sleeping, failing, flaky, long-running, streaming)."""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import Generator
from typing import Any

from spear.worker.context import Context, InvalidArgument
from spear.worker.tasks import Task

demo = Task("demo", name="demo", description="spear's bundled example functions")

EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
WORD = re.compile(r"[^\W\d_]{3,}")
JSON_NUMBER = re.compile(
    r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?", re.ASCII
)  # a numeric string: as JSON writes numbers


@demo.function(inline=True)  # constant time: called on the worker's loop, no thread hop
def echo(value: Any) -> Any:
    """Returns `value` unchanged (the no-op used by benchmarks)."""
    return value


@demo.function(inline=True)
def quick_calculation(input: Any) -> float | int:
    """Returns `input * 2`."""
    number = _number(input, "input")
    return number * 2


@demo.function
def calculate_fibonacci(n: Any) -> int | str:
    """The n-th Fibonacci number; above n=90 as a decimal string.

    The cut is the contract's: from n=79 on the number is past 2**53 already, which JSON readers
    that hold numbers as doubles (JavaScript's) cannot hold exactly."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 10000:
        raise InvalidArgument(f"n must be an integer from 0 to 10000, got {n!r}")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return str(a) if n > 90 else a


@demo.function
def extract_keywords(text: str, top: int = 5) -> list[str]:
    """The `top` most frequent words of 3+ letters, lower-cased, ties by first appearance."""
    if not isinstance(text, str):
        raise InvalidArgument("text must be a string")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InvalidArgument("top must be a non-negative integer")
    words = [w.lower() for w in WORD.findall(text)]
    counts = Counter(words)
    first = {w: i for i, w in reversed(list(enumerate(words)))}
    return sorted(counts, key=lambda w: (-counts[w], first[w]))[:top]


@demo.function
def validate_email(email: str) -> dict[str, Any]:
    """Whether `email` is a syntactically valid address."""
    if not isinstance(email, str):
        raise InvalidArgument("email must be a string")
    return {"email": email, "valid": len(email) <= 254 and bool(EMAIL.match(email))}


@demo.function
async def sleep(ms: Any, ctx: Context) -> int | float:
    """Sleeps `ms` milliseconds, cooperatively cancellable; returns `ms`."""
    duration = _number(ms, "ms")
    if duration < 0:
        raise InvalidArgument("ms must not be negative")
    await asyncio.sleep(duration / 1000)
    slept: int | float = ms  # as given (the number `_number` accepted)
    return slept


@demo.function
def fail(message: Any = "failed on purpose") -> None:  # any JSON: the contract says FUNCTION_ERROR
    """Raises an error with `message`."""
    raise RuntimeError(message)


@demo.function
def flaky(failures: int, ctx: Context) -> int:
    """Raises while the attempt number is at most `failures`, then returns the attempt number."""
    if ctx.attempt <= failures:
        raise RuntimeError(f"flaky: attempt {ctx.attempt} of {failures} planned failures")
    return ctx.attempt


@demo.function
def process(dataset: Any, ctx: Context, steps: int = 10, step_ms: float = 100) -> dict[str, Any]:
    """Long-running: reports progress each step; returns `{"dataset": …, "steps": …}`."""
    for step in range(steps):
        ctx.wait_cancelled(step_ms / 1000)
        ctx.raise_if_cancelled()
        ctx.progress((step + 1) / steps, f"step {step + 1} of {steps}")
    return {"dataset": dataset, "steps": steps}


@demo.function
def generate_text(ctx: Context, prompt: str, tokens: int = 20, delay_ms: Any = 0) -> Generator[str, None, str]:
    """STREAM: yields `tokens` chunks (the prompt's words, over and over), returns the joined text."""
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt must be a string")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= 100_000:
        raise InvalidArgument("tokens must be an integer from 0 to 100000")
    delay = _number(delay_ms, "delay_ms")
    if delay < 0:
        raise InvalidArgument("delay_ms must not be negative")
    words = prompt.split() or ["…"]
    text = []
    for i in range(tokens):
        if i and delay and ctx.wait_cancelled(delay / 1000):
            break
        token = words[i % len(words)] + (" " if i < tokens - 1 else "")
        text.append(token)
        yield token
    return "".join(text)


def _number(value: Any, name: str) -> int | float:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be a number")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    if isinstance(value, str) and JSON_NUMBER.fullmatch(value):  # not Python's `1_000`, `١٢`, ` 12 ` (probe50)
        try:
            return int(value)
        except ValueError:
            try:
                number = float(value)
                if math.isfinite(number):
                    return number
            except ValueError:
                pass
    raise InvalidArgument(f"{name} must be a number or numeric string, got {value!r}")
