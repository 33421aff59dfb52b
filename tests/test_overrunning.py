"""Functions that overrun their attempt in a thread (past their time limit, not watching
`ctx.cancelled`: Python cannot stop a thread) go on in spare threads of the worker, not in the
threads the next calls need; once even the spare ones are taken, the worker takes fewer
invocations, and more again when those functions return (spear/worker/threads.py).

A probe saw the opposite: after 40 such calls every later call of that worker was stored
`started` and then timed out without having run."""

import asyncio
from contextlib import AsyncExitStack

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import ExecutionStatus
from tests.conftest import call_body, has_status, start_spear, until_registered
from tests.own_tasks import DEAF_RELEASE, other, own


def _deaf(limit_ms: int) -> dict:
    return {**call_body("deaf", "ASYNC", seconds=60), "context": {"timeout_ms": limit_ms, "max_retries": 0}}


async def test_overrunning_functions_take_spare_threads_then_the_worker_takes_less(settings, client):
    tuned = with_overrides(settings, worker={"concurrency": 2})
    DEAF_RELEASE.clear()
    async with AsyncExitStack() as stack:
        stack.callback(DEAF_RELEASE.set)  # whatever happens, the threads end
        running = await start_spear(stack, tuned, with_worker=False)
        worker = await components.start_worker(stack, running.nc, tuned, [own])
        await until_registered(running, "own")

        async def overrun(count: int) -> None:
            ids = [(await running.call(client, "invoke_function", _deaf(300)))[0]["execution_id"] for _ in range(count)]
            for execution_id in ids:
                await running.status_until(client, execution_id, has_status(ExecutionStatus.TIMEOUT))

        await overrun(2)  # both threads of `concurrency` 2 hold a function that goes on
        assert worker.threads.overrunning == 2
        added, _ = await running.call(client, "invoke_function", call_body("add", a=1, b=2))
        assert added["result"]["result"] == 3  # run at once, in a spare thread

        await overrun(2)  # the spare threads too
        assert worker.threads.overrunning == 4 and worker.consumers["own"].capacity == 0
        waiting, _ = await running.call(client, "invoke_function", call_body("add", "ASYNC", a=2, b=2))
        await asyncio.sleep(0.5)  # time enough to be taken, were there room
        status, _ = await running.call(client, "get_execution_status", {"execution_id": waiting["execution_id"]})
        assert status["result"]["status"] == ExecutionStatus.PENDING  # not taken: nothing could start it

        DEAF_RELEASE.set()  # the functions return: their threads are free, the worker takes work again

        async def overrunning() -> int:
            return worker.threads.overrunning

        await poll_until(overrunning, lambda n: n == 0, timeout_s=5)
        assert worker.consumers["own"].capacity == 2
        done, _ = await running.status_until(client, waiting["execution_id"], has_status(ExecutionStatus.COMPLETED))
        assert done["result"]["result"] == 4


async def test_a_worker_serving_several_tasks_runs_concurrency_executions_in_all(settings, client):
    """probe28: each task's consumer held `concurrency` invocations, so a worker serving two held
    twice as many as it runs: with its threads busy with one task's calls, a call of the other was
    taken, stored `started`, waited for a thread, and ended TIMEOUT without having run. Now the
    attempts wait for one of the worker's `concurrency` slots before they start: the call waits,
    PENDING, until a running call ends."""
    tuned = with_overrides(settings, worker={"concurrency": 2})
    DEAF_RELEASE.clear()
    async with AsyncExitStack() as stack:
        stack.callback(DEAF_RELEASE.set)
        running = await start_spear(stack, tuned, with_worker=False)
        worker = await components.start_worker(stack, running.nc, tuned, [own, other])
        await until_registered(running, "own")
        await until_registered(running, "other")
        busy = {**call_body("deaf", "ASYNC", seconds=60), "context": {"timeout_ms": 60000, "max_retries": 0}}
        for _ in range(2):
            reply, _ = await running.call(client, "invoke_function", busy)
            await running.status_until(client, reply["execution_id"], has_status(ExecutionStatus.RUNNING))
        body = {**call_body("double", "ASYNC", "other", n=21), "context": {"timeout_ms": 1000, "max_retries": 0}}
        waiting, _ = await running.call(client, "invoke_function", body)
        await asyncio.sleep(1.5)  # past its time limit, had it been started
        status, _ = await running.call(client, "get_execution_status", {"execution_id": waiting["execution_id"]})
        assert status["result"]["status"] == ExecutionStatus.PENDING, status  # not taken: nothing could start it
        assert worker.slots.locked()  # (both slots taken by the running calls)

        DEAF_RELEASE.set()  # the running calls return: room for the waiting one
        done, _ = await running.status_until(client, waiting["execution_id"], has_status(ExecutionStatus.COMPLETED))
        assert done["result"]["result"] == 42
