"""spear's `_send_publish` (spear/jetstream/hpub.py) against nats-py's own: the same bytes in the
pending buffer, the same counters, the same flushes and the same errors, on any input; and a real
connection that publishes with it delivers the same messages."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import hypothesis
import hypothesis.strategies as st
import nats
from nats.aio.client import Client

from spear.jetstream import hpub

ORIGINAL = hpub.original()


class Recorder(Client):
    """A client that is never connected and notes each flush it is asked for."""

    def __init__(self, max_pending: int, flusher_idle: bool, connected: bool = False) -> None:
        super().__init__()
        self.connected = connected
        self.flushes: list[bool] = []
        self._max_pending_size = max_pending
        self._flush_queue = asyncio.Queue()
        if not flusher_idle:
            self._flush_queue.put_nowait(asyncio.Future())

    async def _flush_pending(self, force_flush: bool = False) -> None:
        self.flushes.append(force_flush)

    @property
    def is_connected(self) -> bool:
        return self.connected


async def outcome(send: Any, messages: list[Any], max_pending: int, flusher_idle: bool) -> tuple[Any, ...]:
    """What `send` leaves behind after sending `messages` one after the other (until one fails)."""
    client = Recorder(max_pending, flusher_idle)
    error: tuple[str, str] | None = None
    for subject, reply, payload, headers in messages:
        try:
            await send(client, subject, reply, payload, len(payload), headers)
        except Exception as exc:
            error = (type(exc).__name__, str(exc) if isinstance(exc, nats.errors.Error) else "")
            break
    return client._pending, client._pending_data_size, client.stats, client.flushes, error


# What spear sends, and what it never would (odd names, whitespace, CR/LF, non-ASCII, lone
# surrogates, values that are not text).
SPEAR_NAMES = ["Nats-Expected-Stream", "traceparent", "Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence"]
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
NAME = st.one_of(
    st.sampled_from(SPEAR_NAMES), st.sampled_from(["", " ", " X-Pad ", "a b", "a:b", "é", "x\r\n"]), ANY_TEXT
)
VALUE = st.one_of(
    st.text(max_size=20),
    ANY_TEXT,
    st.sampled_from(["", " v ", "a\r\nPUB x 1", "a\nb", "b\rc", "\n", "\u2028 x \t", "\ud800", "é"]),
    st.integers(),
    st.binary(max_size=4),
)
HEADERS = st.one_of(st.none(), st.dictionaries(NAME, VALUE, max_size=8))
MESSAGE = st.tuples(st.one_of(st.just("P.append.t.x.requested"), ANY_TEXT), ANY_TEXT, st.binary(max_size=40), HEADERS)


@hypothesis.settings(max_examples=800, deadline=None)
@hypothesis.given(st.lists(MESSAGE, min_size=1, max_size=4), st.sampled_from([0, 64, 1 << 20]), st.booleans())
@hypothesis.example([("s", "", b"", {"A": "\ud800", "a b": "x"})], 0, True)  # which error comes first
@hypothesis.example([("s", "", b"", {"A": "\ud800", "B": 1})], 0, True)
@hypothesis.example([("s", "", b"", {"A": "x\ny"})], 0, True)
def test_the_same_bytes_counters_flushes_and_errors_as_nats_py(messages, max_pending, flusher_idle):
    async def both() -> None:
        expected = await outcome(ORIGINAL, messages, max_pending, flusher_idle)
        assert await outcome(hpub.send_publish, messages, max_pending, flusher_idle) == expected

    asyncio.run(both())


def test_spear_s_event_headers_byte_for_byte():
    headers = {
        "Nats-Expected-Stream": "P_EXEC",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "Nats-Msg-Id": "x:started:1",
        "Nats-Expected-Last-Subject-Sequence": "0",
        "Nats-Expected-Last-Subject-Sequence-Subject": "P.exec.*.x.*",
    }
    message = [("P.append.demo.x.started", "_INBOX.a.1", b'{"kind":"started"}', headers)]
    ours = asyncio.run(outcome(hpub.send_publish, message, 0, True))
    assert ours == asyncio.run(outcome(ORIGINAL, message, 0, True))
    assert ours[0][0].startswith(b"HPUB P.append.demo.x.started _INBOX.a.1 ")
    assert ours[0][0].endswith(b"\r\n\r\n" + b'{"kind":"started"}' + b"\r\n")


def test_install_is_what_every_client_uses():
    hpub.install()
    assert Client._send_publish is hpub.send_publish
    hpub.install()  # twice is once
    assert hpub.original() is ORIGINAL


async def test_a_real_connection_with_it_delivers_what_was_published(nats_url):
    hpub.install()
    nc = await nats.connect(nats_url)
    subject = "hp" + uuid.uuid4().hex[:8]
    try:
        sub = await nc.subscribe(subject)
        await nc.publish(subject, b"one", headers={"A": " x\r\ny ", "Nats-Msg-Id": "m1", " ": "skipped"})
        await nc.publish(subject, b"two")
        first, second = await sub.next_msg(timeout=5), await sub.next_msg(timeout=5)
        assert (first.data, first.headers) == (b"one", {"A": "x  y", "Nats-Msg-Id": "m1"})
        assert (second.data, second.headers) == (b"two", None)
    finally:
        await nc.close()


async def publish_each(client: Client, subjects: list[str], payload: bytes) -> None:
    for subject in subjects:
        await Client.publish(client, subject, payload)


async def many_outcome(
    send: Any, subjects: list[str], payload: bytes, max_pending: int, connected: bool
) -> tuple[Any, ...]:
    client = Recorder(max_pending, flusher_idle=True, connected=connected)
    try:
        await send(client, subjects, payload)
    except Exception as exc:
        return type(exc).__name__, client._pending
    return b"".join(client._pending), client._pending_data_size, client.stats


SUBJECT = st.one_of(st.just("$JS.ACK.S.C.1.2.3.4.0"), ANY_TEXT)


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    st.lists(SUBJECT, max_size=5), st.binary(max_size=8), st.sampled_from([0, 64, 1 << 20]), st.booleans()
)
@hypothesis.example(["\ud800"], b"", 0, False)  # nats-py's error (no room while disconnected), not the encoding's
@hypothesis.example(["a b", "\ud800"], b"", 1 << 20, True)
def test_publish_many_queues_what_publishing_each_would_or_nothing(subjects, payload, max_pending, connected):
    """The same bytes and counters as `nc.publish` of each; where that fails on a message, the
    same error, and nothing queued (all or nothing)."""

    async def both() -> None:
        expected = await many_outcome(publish_each, subjects, payload, max_pending, connected)
        ours = await many_outcome(hpub.publish_many, subjects, payload, max_pending, connected)
        if isinstance(expected[0], str):
            assert ours == (expected[0], [])
        else:
            assert ours == expected

    asyncio.run(both())


async def test_publish_many_delivers_on_a_real_connection(nats_url):
    hpub.install()
    nc = await nats.connect(nats_url)
    prefix = "many" + uuid.uuid4().hex[:8]
    try:
        sub = await nc.subscribe(f"{prefix}.*")
        await hpub.publish_many(nc, [f"{prefix}.a", f"{prefix}.b", f"{prefix}.c"], b"+ACK")
        received = [await sub.next_msg(timeout=5) for _ in range(3)]
        assert [(msg.subject, msg.data) for msg in received] == [(f"{prefix}.{x}", b"+ACK") for x in "abc"]
    finally:
        await nc.close()


async def now_outcome(send: Any, messages: list[Any], max_pending: int, connected: bool) -> tuple[Any, ...]:
    """What `send` leaves in the pending buffer after `messages` (until one fails), and the error."""
    client = Recorder(max_pending, flusher_idle=True, connected=connected)
    error: tuple[str, str] | None = None
    for subject, reply, payload, headers in messages:
        try:
            await send(client, subject, payload, reply, headers)
        except Exception as exc:
            error = (type(exc).__name__, str(exc) if isinstance(exc, nats.errors.Error) else "")
            break
    return client._pending, client._pending_data_size, client.stats, error


async def publish_awaited(client: Client, subject: str, payload: bytes, reply: str, headers: Any) -> None:
    await Client.publish(client, subject, payload, reply=reply, headers=headers)


async def publish_now(client: Client, subject: str, payload: bytes, reply: str, headers: Any) -> None:
    assert hpub.publish_now(client, subject, payload, reply, headers)


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(st.lists(MESSAGE, min_size=1, max_size=4), st.sampled_from([0, 64, 1 << 20]), st.booleans())
@hypothesis.example([("s", "a b", b"", None)], 1 << 20, True)  # the reply subject is checked too
@hypothesis.example([("s", "", b"", {"A": "\ud800", "B": 1})], 0, True)
def test_publish_now_queues_what_publish_would_with_its_errors(messages, max_pending, connected):
    """`publish_now` (for callbacks, no await): the same bytes, counters and errors as `publish`."""
    hpub.install()

    async def both() -> None:
        expected = await now_outcome(publish_awaited, messages, max_pending, connected)
        assert await now_outcome(publish_now, messages, max_pending, connected) == expected

    asyncio.run(both())


async def test_publish_now_delivers_on_a_real_connection(nats_url):
    hpub.install()
    nc = await nats.connect(nats_url)
    subject = "now" + uuid.uuid4().hex[:8]
    try:
        sub = await nc.subscribe(subject)
        assert hpub.publish_now(nc, subject, b"one", "", {"Nats-Msg-Id": "m1"})
        assert hpub.publish_now(nc, subject, b"two")
        first, second = await sub.next_msg(timeout=5), await sub.next_msg(timeout=5)  # with no flush asked for
        assert (first.data, first.headers, second.data) == (b"one", {"Nats-Msg-Id": "m1"}, b"two")
    finally:
        await nc.close()
