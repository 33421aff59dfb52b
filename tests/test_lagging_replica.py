"""A worker facing a replicated stream's two transient answers ends the execution once, never
drops it.

Seen on a 3-node cluster under load (`test_every_node_of_a_cluster_answers_sync_calls...`, which
then timed out): a follower's consumer delivered `requested` before the stream leader had
applied it, so the leader refused the attempt's fenced `started` with 10164 ("wrong last
sequence", the subject still "in process") and the leader read that followed found no event at
all. The worker took that for "the execution ended meanwhile", acknowledged, and the execution
never ended. Those two answers cannot be provoked on demand on a real cluster, so the store here
gives them (the server's own refusal, through the store's own mapping) once each, then behaves as
the real JetStream store it is."""

import threading
import time
from contextlib import AsyncExitStack

from spear.core.config import with_overrides
from spear.core.enums import TERMINAL_STATUSES, ExecutionStatus
from spear.core.eventstore import AppendConflict, Stored
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream import topology
from spear.jetstream.connection import connect
from spear.jetstream.errors import append_refusal
from spear.jetstream.store import JetStreamStore
from spear.worker.tasks import Task
from spear.worker.worker import Worker
from tests.conftest import has_status, invoke_body, start_spear


class LaggingReplica(JetStreamStore):
    """The real store, but the first chain of appends is refused as a busy leader refuses it,
    and the next reads miss the execution as a leader that has not applied it yet does."""

    def __init__(self, *args, reads_missed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.refusals_left = 1
        self.misses_left = reads_missed
        self.missed = 0

    def append_chain_now(self, events, **kwargs):
        return False  # a quick attempt's chain goes the awaited way too: refused there, as the usual path's

    async def append_chain(self, events, **kwargs):
        if self.refusals_left:
            self.refusals_left -= 1
            raise append_refusal({"code": 400, "err_code": 10164, "description": "wrong last sequence"})
        return await super().append_chain(events, **kwargs)

    async def last(self, execution_id: str) -> Stored | None:
        if self.misses_left:
            self.misses_left -= 1
            self.missed += 1
            return None
        return await super().last(execution_id)


async def _call_with_lagging_worker(settings, client, reads_missed: int):
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings, with_worker=False)
        nc = await connect(settings, "lagging-worker")
        stack.push_async_callback(nc.close)
        names = Names(settings.subject_prefix)
        store = LaggingReplica(nc, names, 5.0, reads_missed=reads_missed)
        worker = Worker(nc, settings, [demo], store=store)
        await worker.start()
        stack.push_async_callback(worker.stop)
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=7), timeout=20)
        events = [stored.event.kind for stored in await spear.service.store.history(reply["execution_id"])]
        return reply, events, store


async def test_a_refused_start_then_reads_that_miss_the_execution_still_end_it_once(settings, client):
    reply, events, store = await _call_with_lagging_worker(settings, client, reads_missed=2)
    assert reply["result"]["result"] == 7, reply
    assert events == ["requested", "started", "completed"]  # one attempt, stored once
    assert store.missed == 2  # the worker read again rather than conclude the execution had ended


async def test_a_worker_that_never_sees_the_execution_hands_it_back_instead_of_dropping_it(settings, client):
    # More misses than one delivery reads again: the invocation is handed back (nak), and its next
    # delivery, reading the stream as it is, runs it: still one attempt, one end.
    reply, events, store = await _call_with_lagging_worker(settings, client, reads_missed=8)
    assert reply["result"]["result"] == 7, reply
    assert events == ["requested", "started", "completed"]
    assert store.missed == 8


class OneCancelBehind(JetStreamStore):
    """The real store, but the first read after the stubborn function returned answers with the
    cancel request before the newest, as a replica that has not applied the newest yet does (a
    cancel storm on a cluster). It counts the `cancelled` appends refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stale_answers = 0
        self.refused_cancelled = 0

    async def last(self, execution_id: str) -> Stored | None:
        history = await self.history(execution_id)
        asks = [stored for stored in history if stored.event.kind == "cancel_requested"]
        if RETURNED.is_set() and not self.stale_answers and len(asks) >= 2 and history[-1] == asks[-1]:
            self.stale_answers += 1
            return asks[-2]
        return await super().last(execution_id)

    async def append(self, event, **kwargs):
        try:
            return await super().append(event, **kwargs)
        except AppendConflict:
            self.refused_cancelled += event.kind == "cancelled"
            raise


stubborn = Task(task_id="stubborn", description="a function that does not look at ctx.cancelled")
RETURNED = threading.Event()  # set by the function as it returns: the worker's reads after it go stale once


@stubborn.function
def ignores_cancel(ms: int) -> int:
    time.sleep(ms / 1000)  # in a thread, and never asks whether it was cancelled
    RETURNED.set()
    return ms


async def test_an_end_after_a_cancel_storm_read_one_request_behind_is_still_stored(settings, client):
    """The attempt ends while cancel requests keep coming, and the read that follows its fenced
    end's refusal is one request behind: `cancelled` fenced on that request is refused too. That
    refusal was once taken for "it ended another way" and the invocation was acknowledged with no
    end stored: the execution stayed RUNNING for good (a 3-node cluster under kills). Now the
    worker reads again and stores `cancelled` after the newest request."""
    settings = with_overrides(settings, worker={"cancel_grace_ms": 20})  # a cancel reply need not wait
    RETURNED.clear()
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings, with_worker=False)
        nc = await connect(settings, "stale-worker")
        stack.push_async_callback(nc.close)
        store = OneCancelBehind(nc, Names(settings.subject_prefix), 5.0)
        worker = Worker(nc, settings, [stubborn], store=store)
        await worker.start()
        stack.push_async_callback(worker.stop)
        body = {**invoke_body("ignores_cancel", "ASYNC", ms=1500), "task_id": "stubborn"}
        accepted, _ = await spear.call(client, "invoke_function", body)
        execution_id = accepted["execution_id"]
        await spear.status_until(client, execution_id, has_status(ExecutionStatus.RUNNING))
        for _ in range(2):
            answer, _ = await spear.call(client, "cancel_execution", {"execution_id": execution_id})
            assert answer["success"] is True and answer["final_status"] == ExecutionStatus.RUNNING, answer
        final, _ = await spear.status_until(client, execution_id, has_status(*TERMINAL_STATUSES), timeout=15)
        assert final["result"]["status"] == ExecutionStatus.CANCELLED
        kinds = [stored.event.kind for stored in await spear.service.store.history(execution_id)]
        assert kinds == ["requested", "started", "cancel_requested", "cancel_requested", "cancelled"]
        assert store.stale_answers == 1 and store.refused_cancelled == 1  # the path was taken


async def test_a_consumer_ack_wait_lowered_by_a_racing_worker_is_raised_again_before_calls_are_lost(settings, client):
    """Two workers starting at once with different `ack_wait_ms` can leave the lower value on the
    consumer (each read it before the other wrote). The worker with the higher value beats a
    third of its own: its long calls would be redelivered and run twice. It reads the consumer
    again a moment after its start and raises the value back."""
    settings = with_overrides(settings, worker={"ack_wait_ms": 9000})  # beats every 3 s
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings)
        names = spear.names
        consumer = f"CONSUMER.INFO.{names.stream}.{names.worker_consumer('demo')}"
        info = await topology.api_request(client, consumer, None, 5)
        lowered = {**info["config"], "ack_wait": 2_000_000_000}  # what the racing worker wrote last
        await topology.api_request(
            client,
            f"CONSUMER.CREATE.{names.stream}.{names.worker_consumer('demo')}",
            {"stream_name": names.stream, "config": lowered},
            5,
        )
        accepted, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=4500))
        final, _ = await spear.status_until(
            client, accepted["execution_id"], has_status(*TERMINAL_STATUSES), timeout=15
        )
        assert final["result"]["status"] == ExecutionStatus.COMPLETED and final["result"]["attempt"] == 1
        kinds = [stored.event.kind for stored in await spear.service.store.history(accepted["execution_id"])]
        assert kinds == ["requested", "started", "completed"]  # never presumed lost, never run twice
        info = await topology.api_request(client, consumer, None, 5)
        assert info["config"]["ack_wait"] == 9_000_000_000
