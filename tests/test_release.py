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


async def test_a_stream_handed_back_mid_way_says_it_starts_again(settings, client, nats_url):
    """A handed-back attempt runs again as the same attempt, its items' `seq` from 0 again: the
    SDK's `stream()` raised nothing and gave the first run's items and then the second's (a probe
    saw 67 items for 40), and the CLI said nothing. Now both say the stream starts again."""
    import asyncio

    from spear import Client, errors

    tuned = with_overrides(settings, worker={"ack_wait_ms": 1000})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        worker = await components.start_worker(stack, running.nc, tuned, [demo])
        await until_registered(running, "demo")
        async with Client([nats_url], prefix=tuned.subject_prefix) as sdk:
            got: list[str] = []
            three = asyncio.Event()

            async def follow() -> None:
                async for item in sdk.stream("demo", "generate_text", prompt="w", tokens=40, delay_ms=50):
                    got.append(item)
                    if len(got) == 3:
                        three.set()

            following = asyncio.create_task(follow())
            await asyncio.wait_for(three.wait(), 10)
            await worker.stop(grace_s=0.1)
            await components.start_worker(stack, running.nc, tuned, [demo])
            try:
                await asyncio.wait_for(following, 20)
                raise AssertionError(f"no StreamRestarted; {len(got)} items")
            except errors.StreamRestarted as restarted:
                assert restarted.attempt == 1 and "handed back" in str(restarted), restarted
            assert 3 <= len(got) < 40
