"""The shared asyncio helpers: poll until a deadline, call quietly."""

import pytest

from spear.aio import DeadlinePassed, poll_until, quietly


async def test_poll_until_returns_the_first_ready_value():
    answers = iter([1, 2, 3, 4])

    async def probe() -> int:
        return next(answers)

    assert await poll_until(probe, lambda n: n >= 3, timeout_s=5, interval_s=0) == 3


async def test_poll_until_retries_what_it_is_told_to_and_raises_the_last_error_at_the_deadline():
    calls = []

    async def failing() -> None:
        calls.append(1)
        raise ConnectionError(f"try {len(calls)}")

    with pytest.raises(ConnectionError, match="try"):
        await poll_until(failing, timeout_s=0.05, interval_s=0.01, retry_on=lambda e: isinstance(e, ConnectionError))
    assert len(calls) > 1
    calls.clear()
    with pytest.raises(ConnectionError, match="try 1"):  # not retryable: raised at once
        await poll_until(failing, timeout_s=5, retry_on=lambda e: isinstance(e, KeyError))


async def test_poll_until_says_what_it_last_saw_when_never_ready():
    async def probe() -> str:
        return "degraded"

    with pytest.raises(DeadlinePassed) as passed:
        await poll_until(probe, lambda s: s == "healthy", timeout_s=0.03, interval_s=0.01, what="healthy")
    assert passed.value.last == "degraded" and "healthy" in str(passed.value)


async def test_quietly_swallows_failures_of_what_does_not_matter():
    async def boom() -> None:
        raise RuntimeError("connection closed")

    await quietly(boom())
