"""The shared asyncio helpers: poll until a deadline, call quietly."""

import asyncio

import pytest

from spear.aio import DeadlinePassed, InFlight, poll_until, quietly


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


async def test_in_flight_settles_once_none_awaits_an_answer_or_at_the_timeout():
    loop = asyncio.get_running_loop()
    in_flight = InFlight()
    await asyncio.wait_for(in_flight.settle(5), 1)  # none: at once
    in_flight.add()
    in_flight.add()
    began = loop.time()
    await in_flight.settle(0.05)  # two await: only the timeout ends the wait
    assert loop.time() - began >= 0.05 and in_flight.count == 2
    in_flight.done()
    loop.call_later(0.05, in_flight.done)
    await asyncio.wait_for(in_flight.settle(5), 1)  # the last answer ends it
    assert in_flight.count == 0
