"""Small asyncio helpers used across components: call quietly, start work apart from the caller,
poll until a deadline, share a read in flight, count what callbacks started."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


async def quietly(awaitable: Awaitable[Any], what: str = "") -> None:
    """Await something whose failure changes nothing (an ack on a closed connection, say)."""
    try:
        await awaitable
    except Exception as exc:
        if what:
            log.debug("%s failed quietly: %s", what, exc)


def detached(work: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """Start `work` as a task of its own that takes nothing of its caller's context: background
    work a request sets off (a consumer made for SYNC waits, a shared reader, a read shared by
    the callers of a moment) outlives it, and as a copy of its context it logged under its
    execution's id, and traced under its span, long after it ended (probe67)."""
    return asyncio.get_running_loop().create_task(work, name=name, context=contextvars.Context())


class SharedReads(Generic[T]):
    """One read at a time per key: callers that come while one is in flight await its result
    instead of starting another (under load, dozens of requests would otherwise each ask the
    server for the same figure the moment a cached copy goes stale)."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Task[T]] = {}

    async def read(self, key: str, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The result of `make()`, or of the call of it already in flight for `key`."""
        return await asyncio.shield(self.start(key, make))  # a caller that gives up does not cancel the others' read

    def start(self, key: str, make: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Future[T]:
        """The call of `make()` in flight for `key`, started now if there is none; for a caller
        that does not wait for it (its failure is logged, not raised: the next read tries again)."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = detached(make())
            flight.add_done_callback(lambda done: self._landed(key, done))
        return flight

    def _landed(self, key: str, flight: asyncio.Future[T]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled() and flight.exception() is not None:
            log.debug("shared read of %s failed: %s", key, flight.exception())


class InFlight:
    """How many operations started from callbacks await an answer, and a wait for none to (a
    component that stops lets them finish)."""

    def __init__(self) -> None:
        self.count = 0
        self._none = asyncio.Event()
        self._none.set()

    def add(self) -> None:
        """One more awaits its answer."""
        self.count += 1
        if self.count == 1:
            self._none.clear()

    def done(self) -> None:
        """One got its answer."""
        self.count -= 1
        if not self.count:
            self._none.set()

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for none to await an answer."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none.wait(), max(0.0, timeout_s))


class DeadlinePassed(TimeoutError):
    """`poll_until` ran out of time; `last` is the last value the probe returned."""

    def __init__(self, message: str, last: object = None):
        super().__init__(message)
        self.last = last


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    ready: Callable[[T], bool] | None = None,
    *,
    timeout_s: float,
    interval_s: float = 0.1,
    retry_on: Callable[[Exception], bool] | None = None,
    what: str = "condition",
) -> T:
    """Call `probe` every `interval_s` until `ready(value)` (default: any value) and return that
    value. An exception for which `retry_on` says True is tried again too; at the deadline the
    last such exception is raised, or DeadlinePassed if the probe answered but never `ready`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        try:
            value = await probe()
        except Exception as exc:
            if retry_on is None or not retry_on(exc) or loop.time() >= end:
                raise
        else:
            if ready is None or ready(value):
                return value
            if loop.time() >= end:
                raise DeadlinePassed(f"{what} not met within {timeout_s:g} s", value)
        await asyncio.sleep(interval_s)
