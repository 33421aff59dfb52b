"""A quick attempt runs its function before anything is stored: only for a delivery that is
surely the invocation's first (spear/worker/firsts.py). A consumer that lost its state (a
nats-server killed before it wrote its acks) hands out again, as first deliveries, invocations
whose executions ended: none of them may run again."""

import asyncio
from contextlib import AsyncExitStack

from spear.aio import poll_until
from spear.cli import components
from spear.core.enums import ExecutionStatus
from spear.worker.firsts import FirstDeliveries
from tests.conftest import call_body, has_status, start_spear, until_registered
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


def test_after_a_reconnect_no_delivery_is_surely_first_for_a_while():
    """Cancellations stored while the worker's connection was down went unseen (probe33)."""
    firsts = FirstDeliveries(floor=10)
    firsts.be_careful(now=100.0)
    assert not firsts.surely_first("t", 11, 1, now=100.0)
    assert firsts.surely_first("t", 12, 1, now=130.0)


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


async def test_an_invocation_cancelled_while_its_delivery_waits_for_a_slot_never_runs(settings, client, tmp_path):
    """probe33: a first delivery that waited for one of the worker's slots (another task's
    attempt held it) ran its function before `started`, planned from what was read before the
    wait: a cancel stored meanwhile was seen only once `started` was refused, after the function
    had run, and the history (`requested`, `cancelled`) never showed the side effect."""
    from spear.core.config import with_overrides
    from spear.demo import demo

    marks = tmp_path / "marks"
    settings = with_overrides(settings, worker={"concurrency": 1})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        await components.start_worker(stack, running.nc, settings, [demo, own])
        await until_registered(running, "own")
        filler, _ = await running.call(client, "invoke_function", call_body("sleep", "ASYNC", "demo", ms=1500))
        await running.status_until(client, filler["execution_id"], has_status(ExecutionStatus.RUNNING))
        body = call_body("notes_each_run", "ASYNC", marks=str(marks))
        victim, _ = await running.call(client, "invoke_function", body)
        victim_id = victim["execution_id"]
        stream, consumer = running.names.stream, running.names.worker_consumer("own")

        async def delivered() -> int:
            return (await client.jetstream().consumer_info(stream, consumer)).num_ack_pending

        await poll_until(delivered, lambda n: n == 1, timeout_s=10)  # in the worker, waiting for the slot
        cancel, _ = await running.call(client, "cancel_execution", {"execution_id": victim_id})
        assert cancel["final_status"] == "EXECUTION_STATUS_CANCELLED", cancel
        await running.status_until(client, filler["execution_id"], has_status(ExecutionStatus.COMPLETED))
        await poll_until(delivered, lambda n: n == 0, timeout_s=10)
        await asyncio.sleep(0.3)
        assert not marks.exists(), "the cancelled invocation's function ran"
        kinds = [stored.event.kind for stored in await running.service.store.history(victim_id)]
        assert kinds == ["requested", "cancelled"], kinds


async def test_an_inline_invocation_cancelled_while_pending_is_not_run_from_the_read_loop(settings, client, tmp_path):
    """probe33's defect on the read loop's path: the first delivery of an inline function's
    invocation runs there before anything is read or stored; cancelled while it waited for the
    consumer (its one slot held), it ran all the same. The worker now notes `cancelled` events,
    and such a delivery is planned from the log."""
    from spear.core.config import with_overrides

    marks = tmp_path / "marks"
    settings = with_overrides(settings, worker={"concurrency": 1})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await components.start_worker(stack, running.nc, settings, [own])
        await until_registered(running, "own")
        body = call_body("notes_then_sleeps", "ASYNC", marks=str(tmp_path / "filler"), ms=1500)
        filler, _ = await running.call(client, "invoke_function", body)
        await running.status_until(client, filler["execution_id"], has_status(ExecutionStatus.RUNNING))
        victim, _ = await running.call(client, "invoke_function", call_body("notes_inline", "ASYNC", marks=str(marks)))
        cancel, _ = await running.call(client, "cancel_execution", {"execution_id": victim["execution_id"]})
        assert cancel["final_status"] == "EXECUTION_STATUS_CANCELLED", cancel
        await running.status_until(client, filler["execution_id"], has_status(ExecutionStatus.COMPLETED))
        stream, consumer = running.names.stream, running.names.worker_consumer("own")
        await poll_until(lambda: _drained(client, stream, consumer), bool, timeout_s=10)
        assert not marks.exists(), "the cancelled invocation's function ran"
        kinds = [stored.event.kind for stored in await running.service.store.history(victim["execution_id"])]
        assert kinds == ["requested", "cancelled"], kinds
        # and one not cancelled still runs at once, from the read loop
        taken = worker.quick.taken if worker.quick else 0
        reply, _ = await running.call(client, "invoke_function", call_body("notes_inline", marks=str(marks)))
        assert reply["result"]["result"] == 1 and marks.read_text().count("ran") == 1
        assert worker.quick is not None and worker.quick.taken == taken + 1


async def test_two_deliveries_read_together_the_second_cancelled_while_it_waits_never_runs(
    settings, client, nats_url, tmp_path
):
    """review31: `_slot` decided `at_once` before it yielded (`wait_for` runs the acquire in a task
    of its own): two deliveries read in one go both saw the slot free, the second waited for it
    all the same and ran before `started`, so a cancel stored while it waited was ignored."""
    import signal

    from tests.processes import spawn_worker, wait_for_pullers

    marks = tmp_path / "marks"
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await spawn_worker(
            stack,
            nats_url,
            settings.subject_prefix,
            tmp_path / "w.log",
            tasks=("spear.demo:demo", "tests.own_tasks:own"),
            env={"SPEAR_WORKER__CONCURRENCY": "1", "SPEAR_WORKER__ACK_WAIT_MS": "30000"},
        )
        await until_registered(running, "own", timeout=30)
        await until_registered(running, "demo", timeout=30)
        stream = running.names.stream
        await wait_for_pullers(client, stream, running.names.worker_consumer("demo"), 1)
        await wait_for_pullers(client, stream, running.names.worker_consumer("own"), 1)

        # The worker is busy for a moment (a GC pause, the host descheduling it, an inline
        # function on its loop): two invocations come meanwhile and are read in one go.
        worker.send_signal(signal.SIGSTOP)
        try:
            filler, _ = await running.call(client, "invoke_function", call_body("sleep", "ASYNC", "demo", ms=2000))
            await asyncio.sleep(0.1)
            body = call_body("notes_each_run", "ASYNC", marks=str(marks))
            victim, _ = await running.call(client, "invoke_function", body)
            await asyncio.sleep(0.2)
        finally:
            worker.send_signal(signal.SIGCONT)
        await running.status_until(client, filler["execution_id"], has_status(ExecutionStatus.RUNNING))

        async def delivered() -> int:
            own = running.names.worker_consumer("own")
            return (await client.jetstream().consumer_info(stream, own)).num_ack_pending

        await poll_until(delivered, lambda n: n == 1, timeout_s=10)  # in the worker, waiting for the slot
        cancel, _ = await running.call(client, "cancel_execution", {"execution_id": victim["execution_id"]})
        assert cancel["final_status"] == "EXECUTION_STATUS_CANCELLED", cancel
        await running.status_until(client, filler["execution_id"], has_status(ExecutionStatus.COMPLETED))
        await poll_until(delivered, lambda n: n == 0, timeout_s=10)
        await asyncio.sleep(0.3)
        assert not marks.exists(), "the invocation cancelled while it waited for a slot ran"
