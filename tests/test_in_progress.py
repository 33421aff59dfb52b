"""A running attempt's in-progress beat (`+WPI`) ends with the attempt, so an invocation handed
back (nak) after a failure is redelivered.

A beat that went on after the attempt ended would refresh the message's ack timer for ever, and
JetStream would never redeliver it (the symptom of the rare stuck execution of the cluster
node-loss test, when beats were a task whose cancellation nats-py could swallow while a publish
waited for its flush). Beats are a timer now: `stop()` cancels the next one."""

import asyncio
import uuid

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from spear.jetstream.pull import Delivery
from spear.worker.opening import InProgress
from tests.conftest import held_messages


async def test_beats_refresh_the_ack_timer_and_none_goes_out_after_stop(nats_url):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream, subject = f"BEAT{uuid.uuid4().hex[:8]}", f"beat.{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=stream, subjects=[subject])
    try:
        await js.publish(subject, b"invocation")
        config = ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=0.5)
        consumer = await js.pull_subscribe(subject, "w", stream=stream, config=config)
        (msg,) = await consumer.fetch(1, timeout=5)
        delivery = Delivery(nc, msg.subject, msg.reply, msg.data, b"")
        beats = await nc.subscribe(msg.reply)  # (what the worker says of the message, as the server hears it)
        await nc.flush()
        beat = InProgress(delivery, every_s=0.1)
        await asyncio.sleep(1.0)  # twice the ack wait: only the beats keep it from being delivered again
        beat.stop()
        heard = [m.data async for m in held_messages(beats)]
        assert len(heard) >= 5 and set(heard) == {b"+WPI"}, heard
        await delivery.nak(delay=0.1)  # the attempt failed: the invocation is handed back
        (again,) = await consumer.fetch(1, timeout=5)  # a beat still going would hold it back for ever
        assert again.data == b"invocation" and again.metadata.num_delivered == 2
        assert [m.data async for m in held_messages(beats)] == [b'-NAK {"delay": 100000000}']  # no beat after stop
    finally:
        await js.delete_stream(stream)
        await nc.close()
