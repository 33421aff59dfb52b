"""A quick attempt runs its function before anything is stored: only for a delivery that is
surely the invocation's first (spear/worker/firsts.py). A consumer that lost its state (a
nats-server killed before it wrote its acks) hands out again, as first deliveries, invocations
whose executions ended: none of them may run again."""

import asyncio
from contextlib import AsyncExitStack

from spear.aio import poll_until
from spear.cli import components
from spear.worker.firsts import FirstDeliveries
from tests.conftest import call_body, start_spear, until_registered
from tests.own_tasks import own


def test_only_a_first_delivery_beyond_all_handed_out_is_surely_first():
    firsts = FirstDeliveries(floor=10)
    assert not firsts.surely_first("t", 10, 1, now=0.0)  # stored before the worker started
    assert firsts.surely_first("t", 11, 1, now=0.0) and firsts.surely_first("t", 15, 1, now=0.0)
    assert not firsts.surely_first("t", 16, 2, now=0.0)  # delivered before, as JetStream says
    assert firsts.surely_first("t", 17, 1, now=0.0) and firsts.surely_first("other", 11, 1, now=0.0)
    assert not firsts.surely_first("t", 17, 1, now=0.0)  # handed out again (then careful for a while)


def test_a_consumer_seen_handing_out_again_makes_every_delivery_careful_for_a_while():
    """Another worker may have handled what comes above this one's highest (review15)."""
    firsts = FirstDeliveries(floor=10)
    assert firsts.surely_first("t", 20, 1, now=100.0)
    assert not firsts.surely_first("t", 15, 1, now=100.0)  # handed out again: the consumer lost its state
    assert not firsts.surely_first("t", 25, 1, now=101.0)  # above, but perhaps another worker's
    assert not firsts.surely_first("other", 30, 1, now=129.0)
    assert firsts.surely_first("t", 26, 1, now=130.0)  # CAREFUL_S later


async def _forget(client, stream: str, consumer: str) -> None:
    """The task's consumer made again from nothing: what it delivered and what was acked is
    forgotten, so every invocation stored comes again as a first delivery."""
    js = client.jetstream()
    config = (await js.consumer_info(stream, consumer)).config
    await js.delete_consumer(stream, consumer)
    await js.add_consumer(stream, config)


async def _drained(client, stream: str, consumer: str) -> bool:
    info = await client.jetstream().consumer_info(stream, consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_invocations_handed_out_again_as_first_deliveries_do_not_run_again(settings, client, tmp_path):
    marks = tmp_path / "marks"
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await components.start_worker(stack, running.nc, settings, [own])
        await until_registered(running, "own")
        ids = []
        for _ in range(10):
            reply, _ = await running.call(
                client, "invoke_function", call_body("notes_each_run", "ASYNC", marks=str(marks))
            )
            ids.append(reply["execution_id"])
        stream, consumer = running.names.stream, running.names.worker_consumer("own")
        await poll_until(lambda: _drained(client, stream, consumer), bool, timeout_s=10)
        assert marks.read_text().count("ran") == 10

        await _forget(client, stream, consumer)  # under the running worker, which handed them out
        await asyncio.sleep(0.5)
        await poll_until(lambda: _drained(client, stream, consumer), bool, timeout_s=10)
        await worker.stop()
        await _forget(client, stream, consumer)  # and for a worker that starts now
        await components.start_worker(stack, running.nc, settings, [own])
        await poll_until(lambda: _drained(client, stream, consumer), bool, timeout_s=10)

        assert marks.read_text().count("ran") == 10  # none ran again (probe20: unseen runs)
        for execution_id in ids:
            kinds = [stored.event.kind for stored in await running.service.store.history(execution_id)]
            assert kinds == ["requested", "started", "completed"], (execution_id, kinds)
        reply, _ = await running.call(client, "invoke_function", call_body("notes_each_run", marks=str(marks)))
        assert reply["result"]["result"] == 11  # and new ones run
