"""The threads that run a worker's plain functions (neither coroutines nor `inline`), and the
functions that go on in them after their attempt has ended.

Python cannot stop a thread: a function past its time limit, or cancelled, that does not watch
`ctx.cancelled` runs on in its thread after its attempt has ended TIMEOUT or CANCELLED. With a
pool of exactly `worker.concurrency` threads, enough of those left every later call of that
worker queued behind them: stored `started`, then TIMEOUT without having run (a probe: 40 calls
hung on a 90 s sleep, then every call timed out). So the pool has `concurrency` threads more for
such overrunning functions, counts them, and says when even those are taken (`excess`): the
worker then takes that many fewer invocations, leaving them to workers that can start them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


def carried_out(call: Callable[[], Any]) -> Any:
    """`call()`, where a StopIteration it raises comes out as a RuntimeError, as it does from a
    coroutine or a generator (PEP 479): asyncio cannot set a StopIteration on a future (a TypeError
    in the loop's callback), so the attempt awaiting the thread waited until its time limit and
    ended TIMEOUT instead of failing at once (probe28: `next(iter([]))` in a plain function)."""
    try:
        return call()
    except StopIteration as exc:
        raise RuntimeError(f"function raised StopIteration{': ' + str(exc) if str(exc) else ''}") from exc


class FunctionThreads:
    """`concurrency` threads for calls, and as many again for calls that overran their attempt."""

    def __init__(self, concurrency: int, on_change: Callable[[], None] | None = None):
        self.concurrency = concurrency
        self.executor = ThreadPoolExecutor(2 * concurrency, thread_name_prefix="spear-fn")
        self.overrunning = 0  # functions still running in a thread after their attempt ended
        # Calls of attempts not ended, at most `concurrency` at once, as before there were spare
        # threads (a worker serving several tasks holds `concurrency` invocations of each).
        self._live = asyncio.Semaphore(concurrency)
        self.on_change = on_change  # called on the loop whenever `overrunning` changes

    @property
    def excess(self) -> int:
        """Overrunning functions beyond the spare threads: calls they keep from starting."""
        return max(0, self.overrunning - self.concurrency)

    async def run(self, call: Callable[[], Any], what: str = "a function") -> Any:
        """`call()` in a thread. Cancelled (the attempt timed out, or was cancelled), a call not
        started yet never starts; one running is counted as overrunning until it returns."""
        async with self._live:
            future = self.executor.submit(carried_out, call)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if not future.cancel() and not future.done():  # running: it goes on in its thread
                    self._overran(future, what)
                raise

    def _overran(self, future: Future[Any], what: str) -> None:
        loop = asyncio.get_running_loop()
        self.overrunning += 1
        log.warning(
            "worker: %s goes on in its thread after its attempt ended (%d overrunning, %d spare threads)",
            what,
            self.overrunning,
            self.concurrency,
        )
        self._changed()

        def returned(_: Future[Any]) -> None:  # in the function's thread
            with contextlib.suppress(RuntimeError):  # the worker's loop closed meanwhile: nothing to count
                loop.call_soon_threadsafe(self._returned)

        future.add_done_callback(returned)

    def _returned(self) -> None:
        self.overrunning -= 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def shutdown(self) -> None:
        """Start no more calls; threads still running end when their function returns."""
        self.executor.shutdown(wait=False, cancel_futures=True)
