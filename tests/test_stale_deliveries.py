"""Which deliveries a worker takes for stale (worker/pauses.py, PullConsumer.stalled), and which
not: review23 found the time in a delivery's ack subject is when its message was *stored*, not
when the server handed it out (nats-server's ackReply takes the stored message's timestamp), so
reading it as a delivery's age made every redelivery, and every invocation that waited in the
stream over half an ack wait, look held up by a stalled connection."""

import asyncio
import time
import uuid
from contextlib import AsyncExitStack

import pytest

from spear.aio import poll_until
from spear.cli import components
from spear.core import contract
from spear.core.config import with_overrides
from spear.core.enums import ExecutionMode
from spear.core.events import Chunk, Requested, Started, encode_event, envelope
from spear.jetstream import topology
from spear.jetstream.connection import connect
from spear.jetstream.store import JetStreamStore, Stored
from spear.worker.worker import Worker
from tests.conftest import start_spear, until_registered
from tests.own_tasks import own

ACK_WAIT_MS = 2000


def _request(max_retries: int = 0) -> Requested:
    return Requested(
        execution_id="lost-" + uuid.uuid4().hex[:6],
        task_id="own",
        function_name="add",
        at=contract.format_timestamp(time.time()),
        execution_mode=ExecutionMode.ASYNC,
        parameters={"a": 1, "b": 2},
        max_retries=max_retries,
        timeout_ms=30_000,
    )


async def test_the_time_in_an_ack_subject_is_when_the_message_was_stored_not_handed_out(settings):
    """The server's fact 1516ce8 misread: the 8th token of `$JS.ACK...` is the stored message's
    timestamp (the same in every delivery of it), not when that delivery was handed out."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        durable = await topology.ensure_worker_consumer(running.nc, running.names, "own", 1000)
        stored_ns = time.time_ns()
        await running.service.store.append(_request(), expect_last_seq=0)
        await asyncio.sleep(1.5)  # (waits in the stream, no worker to take it)
        sub = await running.nc.jetstream().pull_subscribe_bind(durable, stream=running.names.stream)
        stack.push_async_callback(sub.unsubscribe)
        [first] = await sub.fetch(1, timeout=5)
        [again] = await sub.fetch(1, timeout=5)  # (redelivered an ack wait later)
        times = [int(delivery.reply.split(".")[7]) for delivery in (first, again)]
        assert times[0] == times[1] and abs(times[0] - stored_ns) < 500_000_000, (times, stored_ns)


async def test_an_invocation_that_waited_in_the_stream_is_no_suspect_delivery(settings, monkeypatch):
    """An invocation stored over half an ack wait before a worker (that never paused, whose
    connection never stalled) takes it is no delivery held up by a stall: 1516ce8 took it for one
    (planned from the log, not run at once, never handed back on a stop or an error)."""
    tuned = with_overrides(settings, worker={"ack_wait_ms": ACK_WAIT_MS})
    seen: list[bool] = []
    on_delivery = Worker._on_delivery

    def noting(self, delivery, task_id, consumer):
        on_delivery(self, delivery, task_id, consumer)
        seen.append(delivery.reply in self._suspects)

    monkeypatch.setattr(Worker, "_on_delivery", noting)
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        await topology.ensure_worker_consumer(running.nc, running.names, "own", ACK_WAIT_MS)
        request = _request()
        await running.service.store.append(request, expect_last_seq=0)
        await asyncio.sleep(ACK_WAIT_MS / 1000)  # (a backlog: no worker free to take it)
        await components.start_worker(stack, running.nc, tuned, [own])

        async def ended() -> str:
            last = await running.service.store.last(request.execution_id)
            return last.event.kind if last is not None else ""

        kind = await poll_until(ended, lambda kind: kind in ("completed", "failed", "timed_out"), timeout_s=10)
        assert kind == "completed", kind
        assert seen == [False], seen


@pytest.mark.parametrize("workers", [1, 3])
async def test_a_lost_attempt_is_taken_for_lost_at_its_first_redelivery_when_no_worker_paused(settings, workers):
    """Before 1516ce8 a worker that never paused nor stalled took a lost attempt for lost at the
    invocation's first redelivery, one ack wait after the lost worker took it. Now that
    redelivery's ack-subject time is over an ack wait old (it is the store time), the delivery is
    suspect, and the lost attempt is left alone for one more ack wait (or two) on every redelivery
    path: a worker killed mid-attempt is recovered at least an ack wait late, with no pause, no
    stall anywhere. Each worker leaves it alone once (`_left_alone` is per worker): with 3 workers
    it took 4 ack waits, not "at most one more"."""
    tuned = with_overrides(settings, worker={"ack_wait_ms": ACK_WAIT_MS})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        durable = await topology.ensure_worker_consumer(running.nc, running.names, "own", ACK_WAIT_MS)
        request = _request()
        started = Started(**envelope(request, 1), worker_id="gone", instance_id="")
        await running.service.store.append_batch([request, started], expect_last_seq=0)
        # The worker that took it and started its attempt, then died (its delivery never settled)
        sub = await running.nc.jetstream().pull_subscribe_bind(durable, stream=running.names.stream)
        [_taken] = await sub.fetch(1, timeout=5)
        handed_out = time.monotonic()
        await sub.unsubscribe()
        started_workers = []
        for number in range(workers):
            nc = await connect(tuned, f"review23-w{number}")
            stack.push_async_callback(nc.close)
            started_workers.append(await components.start_worker(stack, nc, tuned, [own]))
        await until_registered(running, "own")

        async def ended() -> str:
            last = await running.service.store.last(request.execution_id)
            return last.event.kind if last is not None else ""

        assert await poll_until(ended, lambda kind: kind == "failed", timeout_s=15) == "failed"
        took_s = time.monotonic() - handed_out
        assert not any(worker.pauses.suspect() for worker in started_workers)  # (no pause anywhere)
        assert took_s < 1.6 * ACK_WAIT_MS / 1000, f"the lost attempt was taken for lost after {took_s:.1f} s"


async def test_a_lost_attempt_of_a_long_stream_is_taken_for_lost_without_reading_its_whole_history(
    settings, monkeypatch
):
    """review24: 32a0619 read an execution's whole history to find when its lost attempt started: for a
    STREAM that yielded tens of thousands of items that takes seconds, with no sign of life for
    the delivery, so JetStream hands it out again every ack wait and each delivery reads it all
    again (40k chunks, ack wait 1 s: ten full reads of 3.5-5 s each for one lost attempt). Now
    one read of its newest `started`."""
    tuned = with_overrides(settings, worker={"ack_wait_ms": 1000})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False, with_gateway=False)
        await topology.ensure_worker_consumer(running.nc, running.names, "own", 1000)
        request = Requested(
            execution_id="long-" + uuid.uuid4().hex[:6],
            task_id="own",
            function_name="async_stream",
            at=contract.format_timestamp(time.time()),
            execution_mode=ExecutionMode.STREAM,
            parameters={"n": 1},
            max_retries=0,
            timeout_ms=600_000,
        )
        started = Started(**envelope(request, 1), worker_id="gone", instance_id="")
        await running.service.store.append_batch([request, started], expect_last_seq=0)
        subject = running.names.append("own", request.execution_id, "chunk")
        for seq in range(5_000):  # (what the lost worker's attempt streamed before it was lost)
            await running.nc.publish(subject, encode_event(Chunk(**envelope(request, 1), seq=seq, data="x" * 200)))
            if seq % 1000 == 0:
                await running.nc.flush()
        await running.nc.flush()
        whole_reads: list[str] = []
        history = JetStreamStore.history

        async def counted(store: JetStreamStore, execution_id: str, after_seq: int = 0) -> list[Stored]:
            whole_reads.append(execution_id)
            return await history(store, execution_id, after_seq)

        monkeypatch.setattr(JetStreamStore, "history", counted)
        await components.start_worker(stack, running.nc, tuned, [own])

        async def ended() -> str:
            last = await running.service.store.last(request.execution_id)
            return last.event.kind if last is not None else ""

        assert await poll_until(ended, lambda kind: kind == "failed", timeout_s=60) == "failed"
        last = await running.service.store.last(request.execution_id)
        assert last.event.result.error_code == "WORKER_LOST"
        assert last.event.result.started_at == started.at  # (what 32a0619 is for, still)
        assert request.execution_id not in whole_reads, whole_reads
