"""The worker's watch for pauses of its own process (spear/worker/pauses.py), with a real loop
blocked, as a paused process's is."""

import asyncio
import time
import uuid
from contextlib import AsyncExitStack

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import ExecutionMode
from spear.core.events import Requested, Started, envelope
from spear.worker.pauses import SETTLE_S, TICK_S, PauseWatch
from tests.conftest import start_spear, until_registered
from tests.own_tasks import own


async def test_a_blocked_loop_is_noticed_then_forgotten():
    watch = PauseWatch(threshold_s=0.5)
    assert not watch.suspect()  # not ticking yet: starting up is no pause
    ticking = watch.start()
    try:
        await asyncio.sleep(3 * TICK_S)
        assert not watch.suspect()  # ticking on time
        time.sleep(0.8)  # noqa: ASYNC251 - the loop does not run: what a SIGSTOP does to it
        assert watch.suspect()  # read before the tick caught up
        await asyncio.sleep(2 * TICK_S)
        assert watch.suspect()  # in the pause's aftermath
        await asyncio.sleep(SETTLE_S)
        assert not watch.suspect()
        time.sleep(0.15)  # noqa: ASYNC251 - well under the threshold: no pause
        await asyncio.sleep(2 * TICK_S)
        assert not watch.suspect()
    finally:
        ticking.cancel()


async def test_a_lost_attempt_is_taken_for_lost_on_a_worker_whose_loop_stalls_again_and_again(settings):
    """review22: each stall of the worker's loop over half an ack wait made what it read next
    suspect, so a really lost attempt was left alone delivery after delivery, for as long as the
    stalls went on. A suspect delivery leaves an execution alone within one ack wait only."""
    tuned = with_overrides(settings, worker={"ack_wait_ms": 300})  # (the least allowed)
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        worker = await components.start_worker(stack, running.nc, tuned, [own])
        await until_registered(running, "own")
        stalling = asyncio.Event()

        async def stall_again_and_again() -> None:
            while not stalling.is_set():
                time.sleep(0.2)  # noqa: ASYNC251 - a stall of the loop (a loaded machine, a big decode)
                await asyncio.sleep(0.7)

        staller = asyncio.get_running_loop().create_task(stall_again_and_again())
        stack.callback(staller.cancel)
        stack.callback(stalling.set)
        await asyncio.sleep(0.3)
        assert worker.pauses.suspect()
        request = Requested(  # an attempt whose worker is gone: `requested` and `started`, stored
            execution_id="lost-" + uuid.uuid4().hex[:6],
            task_id="own",
            function_name="add",
            at="2026-01-01T00:00:00.000Z",
            execution_mode=ExecutionMode.ASYNC,
            parameters={"a": 1, "b": 2},
            max_retries=0,
        )
        started = Started(**envelope(request, 1), worker_id="gone", instance_id="")
        await running.service.store.append_batch([request, started], expect_last_seq=0)

        async def ended() -> str:
            last = await running.service.store.last(request.execution_id)
            return last.event.kind if last is not None else ""

        assert await poll_until(ended, lambda kind: kind == "failed", timeout_s=6) == "failed"
