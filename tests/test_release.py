"""A clean stop is not a lost worker: a worker stopping (SIGTERM, Ctrl-C of `spear up`) hands its
running attempts back (`released`) without using them up, says what it waits for, and only a
real crash counts as WORKER_LOST."""

import logging
from contextlib import AsyncExitStack

from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import TERMINAL_STATUSES, ExecutionStatus
from spear.demo import demo
from tests.conftest import invoke_body, start_spear, until_registered


async def test_clean_stops_hand_running_work_back_without_using_up_attempts(settings, client, caplog):
    tuned = with_overrides(settings, worker={"ack_wait_ms": 1000})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        worker = await components.start_worker(stack, running.nc, tuned, [demo])
        await until_registered(running, "demo")
        body = {**invoke_body("sleep", "ASYNC", ms=1500), "context": {"max_retries": 1}}
        reply, _ = await running.call(client, "invoke_function", body)
        execution_id = reply["execution_id"]
        with caplog.at_level(logging.INFO, logger="spear.worker.worker"):
            for _ in range(3):  # more clean stops than max_retries allows attempts
                await running.status_until(
                    client, execution_id, lambda s: s["result"]["status"] == ExecutionStatus.RUNNING
                )
                await worker.stop(grace_s=0.1)
                worker = await components.start_worker(stack, running.nc, tuned, [demo])
        final, _ = await running.status_until(
            client, execution_id, lambda s: s["result"]["status"] in TERMINAL_STATUSES, timeout=20
        )
        assert final["result"]["status"] == ExecutionStatus.COMPLETED and final["result"]["result"] == 1500
        assert final["result"]["attempt"] == 1  # three stops, no attempt used up
        kinds = [event.kind for event, _ in await running.service.store.history(execution_id)]
        assert kinds.count("released") == 3 and "retrying" not in kinds, kinds
        assert kinds[-1] == "completed"
    said = caplog.text
    assert "waiting up to 0 s for 1 running execution(s)" in said and execution_id in said
    assert "handed back" in said
