"""The worker's watch for pauses of its own process (spear/worker/pauses.py), with a real loop
blocked, as a paused process's is."""

import asyncio
import time

from spear.worker.pauses import SETTLE_S, TICK_S, PauseWatch


async def test_a_blocked_loop_is_noticed_then_forgotten():
    watch = PauseWatch(threshold_s=0.5)
    assert not watch.suspect()  # not ticking yet: starting up is no pause
    ticking = asyncio.get_running_loop().create_task(watch.run())
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
