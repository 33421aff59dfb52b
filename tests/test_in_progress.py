"""A running attempt's in-progress beat (`+WPI`) ends with the attempt, even when nats-py swallows
its cancellation, so an invocation handed back (nak) after a failure is redelivered.

nats-py's publish can wait for its flush (`Client._flush_pending`), which catches
`CancelledError` and returns: a cancellation that lands there is lost and the publishing task goes
on. A beat that went on would refresh the message's ack timer for ever, and JetStream would never
redeliver it (the symptom of the rare stuck execution of the cluster node-loss test)."""

import asyncio
import uuid

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from spear.worker.opening import InProgress


def _awaiting(task: asyncio.Task) -> list[str]:
    """The coroutines `task` is suspended in, outermost first (introspection only)."""
    names = []
    coro = task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_name)
        coro = coro.cr_await
    return names


async def _until_suspended_in_flush(task: asyncio.Task) -> None:
    for _ in range(100_000):
        if "_flush_pending" in _awaiting(task):
            return
        await asyncio.sleep(0)
    raise AssertionError("the beat never waited for a flush")


async def test_a_nak_after_the_beats_cancellation_was_swallowed_is_still_redelivered(nats_url):
    # Every publish on this connection waits for its flush, as publishes do around a reconnect.
    nc = await nats.connect(nats_url, pending_size=1)
    js = nc.jetstream()
    stream, subject = f"BEAT{uuid.uuid4().hex[:8]}", f"beat.{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=stream, subjects=[subject])
    try:
        await js.publish(subject, b"invocation")
        config = ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=0.5)
        consumer = await js.pull_subscribe(subject, "w", stream=stream, config=config)
        (msg,) = await consumer.fetch(1, timeout=5)
        beat = InProgress(msg, every_s=0.001)
        await _until_suspended_in_flush(beat.task)
        beat.stop()  # the attempt failed: its beat is cancelled (and that is lost) ...
        await msg.nak(delay=0.1)  # ... and the invocation handed back
        (again,) = await consumer.fetch(1, timeout=5)  # a beat still going would hold it back for ever
        assert again.data == b"invocation" and again.metadata.num_delivered == 2
        await asyncio.wait({beat.task}, timeout=1)
        assert beat.task.done()  # the beat has ended
    finally:
        await js.delete_stream(stream)
        await nc.close()
