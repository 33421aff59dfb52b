"""The worker's function threads (spear/worker/threads.py) around the end of its event loop."""

import asyncio
import logging
import threading

from spear.worker.threads import FunctionThreads


def test_a_function_that_returns_after_the_workers_loop_closed_logs_nothing(caplog):
    """An overrunning function returning once the worker had stopped called back into a closed
    loop: concurrent.futures logged "exception calling callback" with a traceback (a review)."""
    threads = FunctionThreads(1)
    release = threading.Event()
    returned = threading.Event()

    def overrunning() -> None:
        release.wait(5)
        returned.set()

    async def attempt() -> None:
        call = asyncio.ensure_future(threads.run(overrunning))
        await asyncio.sleep(0.05)
        call.cancel()  # its attempt ends; the function goes on in its thread
        await asyncio.gather(call, return_exceptions=True)
        assert threads.overrunning == 1

    with caplog.at_level(logging.ERROR):
        asyncio.run(attempt())  # the loop closes with the function still running
        release.set()
        assert returned.wait(5)
        threads.shutdown()
        threads.executor.shutdown(wait=True)
    assert "exception calling callback" not in caplog.text and "Event loop is closed" not in caplog.text
