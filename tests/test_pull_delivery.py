"""A pull consumer's deliveries as bytes (`Delivery`, the projection's intake): the same
subject, data, headers and status handling as nats-py's `Msg`, without making one."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

import hypothesis
import nats
import pytest
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, Placement, StreamConfig

from spear.aio import poll_until
from spear.core.enums import ExecutionMode
from spear.core.events import Requested, decode_event
from spear.jetstream import rawsub, topology
from spear.jetstream.embedded import EmbeddedNats
from spear.jetstream.pull import STALL_SETTLE_S, Delivery, PullConsumer, status_headers, stream_sequence
from spear.jetstream.store import JetStreamStore
from tests.conftest import publish_raw
from tests.processes import free_port
from tests.stallproxy import LagProxy, StallProxy

_name = st.text(st.sampled_from("abcXYZ-_09"), min_size=1, max_size=12)
_value = st.text(st.sampled_from("abc xyz:;=/-_09éü"), max_size=20)
_lines = st.lists(st.tuples(_name, _value), max_size=5)


def _block(first: str, lines: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines) + "\r\n").encode()


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(_lines)
def test_a_deliverys_headers_are_what_nats_py_parses(lines):
    block = _block("NATS/1.0", lines)
    expected = asyncio.run(Client()._process_headers(block))
    assert Delivery(Client(), "s", "r", b"x", block).headers == (expected or None)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    st.sampled_from(["100", "404", "408", "409", "503"]),
    st.sampled_from(["", "Idle Heartbeat", "Request Timeout", "No Messages", "Consumer Deleted"]),
    _lines,
)
def test_a_status_line_is_read_as_nats_py_reads_it(code, description, lines):
    # The server gives a description wherever header lines follow (nats-py misreads a bare code
    # followed by headers, taking them for the description: nothing a server sends).
    hypothesis.assume(description or not lines)
    block = _block(f"NATS/1.0 {code} {description}".rstrip(), lines)
    assert status_headers(block) == asyncio.run(Client()._process_headers(block))


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    st.lists(st.tuples(st.one_of(_name, st.sampled_from(["traceparent", " traceparent", "traceparentx"])), _value)),
    st.sampled_from(["traceparent", "abc", "x"]),
)
def test_one_header_read_alone_is_what_the_whole_block_gives(lines, name):
    block = _block("NATS/1.0", lines)
    assert Delivery(Client(), "s", "r", b"x", block).header(name) == (
        Delivery(Client(), "s", "r", b"x", block).headers or {}
    ).get(name)


def test_a_message_without_headers_has_none():
    assert Delivery(Client(), "s", "r", b"x", b"").headers is None


async def _raw_consumer(client, names) -> tuple[PullConsumer, asyncio.Queue[Delivery]]:
    """A started pull consumer of every event, its deliveries queued as `Delivery`s."""
    await topology.ensure_base(client, names)
    config = {"durable_name": "raw", "ack_policy": "explicit", "filter_subject": f"{names.prefix}.exec.>"}
    await topology.ensure_consumer(client, names.stream, config)
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = PullConsumer(client, names.stream, "raw", received.put_nowait, capacity=8)
    await consumer.start()
    return consumer, received


async def test_deliveries_come_as_bytes_and_a_nak_brings_one_back(client, names):
    """Delivered events (subject, data, headers, stream sequence) reach `on_delivery`; a nak with
    a delay hands one back, delivered again after it."""
    consumer, received = await _raw_consumer(client, names)
    try:
        store = JetStreamStore(client, names)
        event = Requested(
            execution_id="D1",
            task_id="demo",
            function_name="echo",
            at="2026-01-01T00:00:00.000Z",
            execution_mode=ExecutionMode.ASYNC,
        )
        appended = await store.append(event, expect_last_seq=0, msg_id="D1:requested")
        first = await asyncio.wait_for(received.get(), 5)
        assert first.subject == f"{names.prefix}.exec.demo.D1.requested"
        assert decode_event(first.data, first.subject) == event
        assert first.headers is not None and first.headers["Nats-Msg-Id"] == "D1:requested"
        assert stream_sequence(first) == appended.seq
        await first.nak(delay=0.3)
        consumer.done()
        again = await asyncio.wait_for(received.get(), 5)
        assert stream_sequence(again) == appended.seq and again.reply != first.reply  # delivered anew
        await client.publish(again.reply, b"+ACK")
        consumer.done()
    finally:
        await consumer.stop()


async def test_a_delivery_is_settled_once_as_nats_py_msgs_are(client, names):
    """A worker settles deliveries with `ack`, `nak`, `term` and `in_progress`: each says to the
    server what nats-py's `Msg` says, and once one of the first three is said nothing more may be
    (MsgAlreadyAckdError, as nats-py raises)."""
    consumer, received = await _raw_consumer(client, names)
    store = JetStreamStore(client, names)
    try:
        for execution_id in ("S1", "S2"):
            event = Requested(
                execution_id=execution_id,
                task_id="demo",
                function_name="echo",
                at="2026-01-01T00:00:00.000Z",
                execution_mode=ExecutionMode.ASYNC,
            )
            await store.append(event, expect_last_seq=0)
        acked, termed = await asyncio.wait_for(received.get(), 5), await asyncio.wait_for(received.get(), 5)
        await acked.in_progress()  # as often as wanted, before it is settled
        await acked.ack()
        await termed.term()
        for settled in (acked, termed):
            for say in (settled.ack(), settled.nak(), settled.term(), settled.in_progress()):
                with pytest.raises(MsgAlreadyAckdError):
                    await say
        consumer.done(2)
        info = await poll_until(
            lambda: client.jetstream().consumer_info(names.stream, "raw"),
            lambda info: info.num_ack_pending == 0,
            timeout_s=5,
        )
        assert info.num_pending == 0 and info.num_redelivered == 0  # neither comes back
    finally:
        await consumer.stop()


async def test_a_stored_subject_that_is_not_utf8_is_delivered_as_junk(client, names, nats_url):
    """Deliveries are taken inside the connection's read loop: a subject the server stored with
    bytes that are not UTF-8 once raised there and ended the loop (nothing more was read)."""
    consumer, received = await _raw_consumer(client, names)
    try:
        junk_subject = f"{names.prefix}.append.demo.".encode() + b"\xff.requested"
        await publish_raw(nats_url, b"PUB %s 2\r\n{}\r\n" % junk_subject)
        await client.publish(f"{names.prefix}.append.demo.D2.requested", b"{}")
        junk = await asyncio.wait_for(received.get(), 5)
        assert junk.subject == f"{names.prefix}.exec.demo.\ufffd.requested" and junk.data == b"{}"
        after = await asyncio.wait_for(received.get(), 5)  # the connection reads on
        assert after.subject == f"{names.prefix}.exec.demo.D2.requested"
        assert stream_sequence(after) == stream_sequence(junk) + 1
    finally:
        await consumer.stop()


async def test_a_raw_handler_that_raises_leaves_the_connection_reading(client):
    """What a raw subscription's handler raises is logged, not passed to nats-py's read loop
    (which would end: the connection would read nothing more)."""
    seen: list[bytes] = []

    def handler(subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        seen.append(data)
        raise ValueError(data)

    subject = "raw" + uuid.uuid4().hex[:8]
    sub = await rawsub.subscribe_raw(client, subject, handler)
    try:
        await client.publish(subject, b"one")
        await client.publish(subject, b"two")
        await poll_until(lambda: asyncio.sleep(0, len(seen)), lambda n: n == 2, timeout_s=5, interval_s=0.01)
        await client.flush(timeout=5)  # a PONG, read by the same loop
        assert seen == [b"one", b"two"]
    finally:
        await sub.unsubscribe()


async def test_a_lowered_capacity_hands_back_what_was_asked_for_before(client, names):
    """A worker lowers its consumers' capacity while functions that overran hold its threads
    (worker/threads.py): deliveries already asked for then come anyway, and were taken (a review:
    they would wait for a thread and time out unrun). They are handed back, to be delivered again."""
    consumer, received = await _raw_consumer(client, names)  # capacity 8, asked for at once
    try:
        consumer.resize(0)
        store = JetStreamStore(client, names)
        for n in range(3):
            event = Requested(
                execution_id=f"C{n}",
                task_id="demo",
                function_name="echo",
                at="2026-01-01T00:00:00.000Z",
                execution_mode=ExecutionMode.ASYNC,
            )
            await store.append(event, expect_last_seq=0, msg_id=f"C{n}:requested")
        await asyncio.sleep(0.5)
        assert received.empty() and consumer.in_hand == 0  # none taken
        consumer.resize(8)  # room again: delivered anew
        firsts = [await asyncio.wait_for(received.get(), 5) for _ in range(3)]
        assert sorted(d.subject.split(".")[-2] for d in firsts) == ["C0", "C1", "C2"]
    finally:
        await consumer.stop()


async def test_deliveries_beyond_capacity_that_may_not_be_handed_back_wait_their_ack_wait(client, names):
    """A worker leaves a delivery that may have waited out a pause or a stall (worker/pauses.py)
    to its ack wait: handed back, a live attempt's invocation would be handed out again at once."""
    consumer, received = await _raw_consumer(client, names)  # (ack wait: 30 s)
    consumer.may_hand_back = lambda delivery: delivery.subject.split(".")[-2] != "K1"
    try:
        consumer.resize(0)
        store = JetStreamStore(client, names)
        for name in ("K0", "K1"):
            event = Requested(
                execution_id=name,
                task_id="demo",
                function_name="echo",
                at="2026-01-01T00:00:00.000Z",
                execution_mode=ExecutionMode.ASYNC,
            )
            await store.append(event, expect_last_seq=0, msg_id=f"{name}:requested")
        await asyncio.sleep(0.5)
        consumer.resize(8)
        first = await asyncio.wait_for(received.get(), 5)
        assert first.subject.split(".")[-2] == "K0"  # handed back, delivered anew
        with pytest.raises(TimeoutError):  # left to its ack wait
            await asyncio.wait_for(received.get(), 1.5)
    finally:
        await consumer.stop()


async def _stream_of_its_own(
    stack: AsyncExitStack, nats_url: str, **config: object
) -> tuple[str, str, JetStreamContext]:
    """A stream (of `config`) and its consumer `c` of a test's own (prefix, stream name,
    JetStream context), deleted when `stack` closes."""
    prefix = "r24" + uuid.uuid4().hex[:8]
    stream = prefix.upper()
    direct = await nats.connect(nats_url)
    stack.push_async_callback(direct.close)
    js = direct.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"], **config))
    stack.push_async_callback(js.delete_stream, stream)
    await js.add_consumer(stream, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=60))
    return prefix, stream, js


async def _watched_consumer(
    stack: AsyncExitStack, nc: Client, stream: str
) -> tuple[PullConsumer, dict[bytes, tuple[bool, float]]]:
    """A started consumer `c` of `stream` (heartbeats every 0.2 s, `stall_s` 1 s) and what it read:
    each delivery's data -> whether it read as stalled, and when (each done with at once)."""
    consumer = PullConsumer(nc, stream, "c", None, 2, heartbeat_s=0.2, stall_s=1.0)
    read: dict[bytes, tuple[bool, float]] = {}

    def on_delivery(delivery: Delivery) -> None:
        read[delivery.data] = (consumer.stalled(), time.monotonic())
        consumer.done()

    consumer.on_delivery = on_delivery
    await consumer.start()
    stack.push_async_callback(consumer.stop)
    return consumer, read


async def _connected_through(stack: AsyncExitStack, nats_url: str, kind: type[Any]) -> tuple[Any, Client]:
    """A proxy of `kind` (tests/stallproxy.py) to the server at `nats_url`, serving until `stack`
    closes, and a connection through it (no PINGs of its own to notice a lag)."""
    host, port = nats_url.removeprefix("nats://").split(":")
    proxy = await stack.enter_async_context(kind(host, int(port)).serving())
    nc = await nats.connect(proxy.url, ping_interval=60)
    stack.push_async_callback(nc.close)
    return proxy, nc


async def _published_and_read(
    js: JetStreamContext, subject: str, data: bytes, read: dict[bytes, tuple[bool, float]]
) -> tuple[bool, float]:
    """Publish `data` and wait until the consumer read it: whether it read as stalled, and how long
    after it was published."""
    sent = time.monotonic()
    await js.publish(subject, data)
    await poll_until(lambda: asyncio.sleep(0, data in read), bool, timeout_s=10)
    stalled, at = read[data]
    return stalled, at - sent


@pytest.mark.parametrize("capacity_after", [1, 2])
async def test_a_delivery_held_up_while_the_capacity_was_lowered_is_read_as_stalled(nats_url, capacity_after):
    """review24: a stall is told by silence while a pull request is out (`credits > 0`). The
    watchdog zeroes `credits` after 2.5 s of silence and asks anew for what there is room for:
    with the capacity lowered meanwhile (a thread that overran its time limit) there is none, so
    the request held up in the stall looks settled, and the next `_ask` (the slot freed) counts
    the silence as none. The delivery that waited out the stall then reads as fresh: handed back
    at once (nak) beyond capacity, or run as a surely-first delivery."""
    async with AsyncExitStack() as stack:
        prefix, stream, js = await _stream_of_its_own(stack, nats_url)
        host, port = nats_url.removeprefix("nats://").split(":")
        proxy = await stack.enter_async_context(StallProxy(host, int(port)).serving())
        nc = await nats.connect(proxy.url)
        stack.push_async_callback(nc.close)
        consumer = PullConsumer(nc, stream, "c", None, 2, heartbeat_s=0.2, stall_s=1.0)
        read: dict[bytes, bool] = {}  # what was read, and whether in a stall's aftermath

        def on_delivery(delivery: Delivery) -> None:
            read[delivery.data] = consumer.stalled()

        def may_hand_back(delivery: Delivery) -> bool:  # (as the worker's: never a suspect one)
            read[delivery.data] = consumer.stalled()
            return not consumer.stalled()

        consumer.on_delivery, consumer.may_hand_back = on_delivery, may_hand_back
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        await js.publish(f"{prefix}.x", b"running")  # (held: its function overruns its time limit)
        await poll_until(lambda: asyncio.sleep(0, b"running" in read), bool, timeout_s=5)
        consumer.resize(1)  # (its thread goes on: one slot fewer)
        proxy.stall()
        await js.publish(f"{prefix}.x", b"held up")  # handed to the request out, held in the stall
        await asyncio.sleep(3.5)  # (the watchdog asked anew meanwhile)
        consumer.resize(capacity_after)  # 2: the overrunning thread ended
        proxy.flow()
        await poll_until(lambda: asyncio.sleep(0, b"held up" in read), bool, timeout_s=5)
        assert read[b"held up"], "read 3.5 s after the server handed it out, with no stall noticed"


async def test_a_delivery_on_a_connection_that_runs_late_is_read_as_stalled_until_it_catches_up(nats_url):
    """review24: silence tells a connection that stops, not one that runs late. Once a lag has set
    in (its onset's silence noticed and forgotten), heartbeats come at their pace, each late, and
    so does a delivery, however late: it read as fresh. The round trip timed on the connection
    tells it; and once the lag is gone, what is read is fresh again."""
    async with AsyncExitStack() as stack:
        prefix, stream, js = await _stream_of_its_own(stack, nats_url)
        proxy, nc = await _connected_through(stack, nats_url, LagProxy)
        consumer, read = await _watched_consumer(stack, nc, stream)
        await _published_and_read(js, f"{prefix}.x", b"before", read)
        proxy.lag_s = 1.5  # each way: a round trip of 3 s, three times `stall_s`
        await asyncio.sleep(3.5)  # (the onset's silence noticed, and forgotten)
        stalled, late_s = await _published_and_read(js, f"{prefix}.x", b"late", read)
        assert late_s > 1.2  # (it did wait out the lag)
        assert stalled, f"read {late_s:.1f} s after it was handed out, with no lag noticed"
        proxy.lag_s = 0.0
        await poll_until(lambda: asyncio.sleep(0, not consumer.stalled()), bool, timeout_s=10, what="caught up")
        await asyncio.sleep(STALL_SETTLE_S + 0.5)  # (past the stall's aftermath: CI failed here once, loaded)
        await _published_and_read(js, f"{prefix}.x", b"after", read)
        assert not read[b"after"][0] and not read[b"before"][0], read


async def test_a_consumer_whose_capacity_was_full_a_long_time_reads_on_with_no_stall(nats_url):
    """The other side of the above: no request out (every slot taken), nothing is heard, and
    that silence, however long, and the watchdog's turns in it, are no stall."""
    async with AsyncExitStack() as stack:
        prefix, stream, js = await _stream_of_its_own(stack, nats_url)
        nc = await nats.connect(nats_url)
        stack.push_async_callback(nc.close)
        consumer = PullConsumer(nc, stream, "c", None, 2, heartbeat_s=0.2, stall_s=1.0)
        read: dict[bytes, bool] = {}
        consumer.on_delivery = lambda delivery: read.__setitem__(delivery.data, consumer.stalled())
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        for data in (b"one", b"two"):
            await js.publish(f"{prefix}.x", data)
        await poll_until(lambda: asyncio.sleep(0, len(read) == 2), bool, timeout_s=5)
        await asyncio.sleep(3.5)  # full: nothing asked, nothing heard (the watchdog looked meanwhile)
        consumer.done()
        await js.publish(f"{prefix}.x", b"three")
        await poll_until(lambda: asyncio.sleep(0, b"three" in read), bool, timeout_s=5)
        assert read == {b"one": False, b"two": False, b"three": False}, read


class InboundLagProxy(StallProxy):
    """A LagProxy whose lag holds up only what the server sends (a link whose receive side's
    buffers fill): the client's own traffic reaches the server at once."""

    lag_s = 0.0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        outbound = StallProxy._pump(self, reader, up_writer)  # client -> server: no lag
        inbound = LagProxy._pump(self, up_reader, writer)  # server -> client: self.lag_s
        for pump in (outbound, inbound):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)


async def test_a_delivery_late_by_a_lag_grown_past_stall_s_between_two_probes_is_read_as_stalled(nats_url):
    """review26: a probe covers a delivery it was sent after; one handed out just after a probe
    waits for the next, up to a heartbeat later. A lag that grew from under `stall_s` to over it
    (no silence anywhere) had that delivery read over `stall_s` late as fresh: the previous probe
    came back quick, the next had not been out `stall_s` yet. A probe out `stall_s` less a
    heartbeat is enough now."""
    async with AsyncExitStack() as stack:
        prefix, stream, js = await _stream_of_its_own(stack, nats_url)
        proxy, nc = await _connected_through(stack, nats_url, InboundLagProxy)
        consumer, read = await _watched_consumer(stack, nc, stream)
        probed = asyncio.Event()
        send_probe = consumer._time_round_trip

        def observed() -> None:  # (observed only: the probe is sent as before)
            send_probe()
            probed.set()

        consumer._time_round_trip = observed  # type: ignore[method-assign]
        proxy.lag_s = 0.9  # under stall_s: round trips of 0.9 s, nothing suspect
        await asyncio.sleep(2.5)  # (no silence anywhere: a step of 0.9 s is no stall of 1 s)
        probed.clear()
        await probed.wait()  # a probe just went out (its echo passes the proxy before the lag grows)
        await asyncio.sleep(0.03)
        proxy.lag_s = 1.1  # over stall_s now; the next probe goes out ~0.17 s from now
        stalled, late_s = await _published_and_read(js, f"{prefix}.x", b"late", read)
        assert late_s > 1.0, late_s  # held up over stall_s
        assert stalled, f"read {late_s:.2f} s after it was handed out (stall_s 1.0), not noticed"


async def test_a_delivery_late_on_a_cluster_route_is_read_as_stalled(tmp_path):
    """review26: a probe that timed the worker's link to its own server missed the path a
    delivery takes: on a cluster the consumer's leader may be another server, and what it hands
    out (heartbeats too) crosses a route first. A route that runs late (buffers that fill) holds
    every delivery up, heartbeats at their pace, no silence. The probe is a request the
    consumer's leader answers, over the same route."""
    client_a, cluster_a, client_b, cluster_b = (free_port() for _ in range(4))
    async with AsyncExitStack() as stack:
        # b's route to a goes through a proxy that can make it run late
        route = await stack.enter_async_context(LagProxy("127.0.0.1", cluster_a).serving())
        a = EmbeddedNats(
            tmp_path / "a",
            port=client_a,
            extra_config='server_name: "a"\nserver_tags: ["a"]\n'
            # (a route to itself, ignored: a JetStream cluster wants one configured)
            f'cluster {{ name: "lag", listen: "127.0.0.1:{cluster_a}", '
            f'routes: ["nats-route://127.0.0.1:{cluster_a}"] }}\n',
        )
        b = EmbeddedNats(
            tmp_path / "b",
            port=client_b,
            extra_config='server_name: "b"\nserver_tags: ["b"]\n'
            f'cluster {{ name: "lag", listen: "127.0.0.1:{cluster_b}", no_advertise: true, '
            f'routes: ["nats-route://127.0.0.1:{route.port}"] }}\n',
        )
        for server in (a, b):
            stack.callback(server.stop)
            await asyncio.to_thread(server.start)
        url_a, url_b = f"nats://127.0.0.1:{client_a}", f"nats://127.0.0.1:{client_b}"

        made: list[tuple[str, str, object]] = []

        async def make() -> bool:
            try:
                made.append(await _stream_of_its_own(stack, url_b, placement=Placement(tags=["b"])))
                return True
            except Exception:
                return False

        await poll_until(make, bool, timeout_s=30, interval_s=0.5, what="a stream on b (cluster up)")
        prefix, stream, js = made[0]
        nc = await nats.connect(url_a, ping_interval=60)  # the worker: connected to a
        stack.push_async_callback(nc.close)
        _consumer, read = await _watched_consumer(stack, nc, stream)
        await _published_and_read(js, f"{prefix}.x", b"before", read)
        route.lag_s = 1.5  # the route b -> a (and back) runs 1.5 s late
        await asyncio.sleep(3.5)  # (the onset's silence noticed, and forgotten, as in ce7943b's test)
        # (published to b, the stream's server: stored at once)
        stalled, late_s = await _published_and_read(js, f"{prefix}.x", b"late", read)
        route.lag_s = 0.0  # (the clean-up's requests cross it too)
        assert late_s > 1.2, late_s  # held up on the route, over stall_s
        assert stalled, f"read {late_s:.1f} s after it was handed out (stall_s 1.0), not noticed"


async def test_slots_freed_while_a_request_was_out_are_asked_for_when_it_is_used_up(nats_url):
    """probe30: slots freed while a few credits were out (fewer than a quarter of the capacity,
    so not asked for then) stayed empty once those credits were used up, until the watchdog's
    silence check asked again (~3 s): a worker ran 13 of 16 with work waiting."""
    async with AsyncExitStack() as stack:
        prefix, stream, js = await _stream_of_its_own(stack, nats_url)
        nc = await nats.connect(nats_url)
        stack.push_async_callback(nc.close)
        consumer = PullConsumer(nc, stream, "c", None, 16)
        read: list[bytes] = []
        consumer.on_delivery = lambda delivery: read.append(delivery.data)
        await consumer.start()
        stack.push_async_callback(consumer.stop)

        async def publish(count: int, name: str) -> None:
            for n in range(count):
                await js.publish(f"{prefix}.x", f"{name}{n}".encode())
            await poll_until(
                lambda: asyncio.sleep(0, len([d for d in read if d.startswith(name.encode())]) == count),
                bool,
                timeout_s=5,
            )

        await publish(13, "a")  # 13 in hand, 3 asked for still
        consumer.done(2)  # two slots free: too few to ask for while 3 are out
        await publish(3, "b")  # the 3 come: none out now, two slots free
        started = time.monotonic()
        await publish(2, "c")
        assert time.monotonic() - started < 1.0, "the free slots were not asked for"
