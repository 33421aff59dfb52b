"""spear's protocol parser against nats-py's own, as an oracle: random traffic (well-formed and
not), cut anywhere, must give the same calls on the client, the same state and the same errors;
and a real connection with it in place does what nats-py's does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import hypothesis
import nats
import nats.errors
import pytest
from hypothesis import strategies as st
from nats.js.api import StreamConfig
from nats.protocol.parser import Parser

from spear.jetstream import rawsub, wireparser

ORIGINAL = wireparser.original()
assert ORIGINAL is not None and wireparser._same_as_nats()  # the nats-py these tests speak of


class Recorder:
    """Stands in for the client's dispatch methods; resets the parser on a stale connection, as
    nats-py's client does (mid-parse)."""

    def __init__(self, as_utf8: bool = True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parser: Parser | None = None
        self.as_utf8 = as_utf8  # subjects as spear's parser hands them on (nats-py's: as they came)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, payload: bytes, hdr: bytes | None) -> None:
        if self.as_utf8:
            subject, reply = wireparser.utf8(subject), wireparser.utf8(reply)
        self.calls.append(
            ("msg", sid, subject, reply, payload, hdr, type(subject), type(reply), type(payload), type(hdr))
        )

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))
        if "stale connection" in err and self.parser is not None:
            self.parser.reset()

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a parse to its end: the recorder never waits, so neither does the parse."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise AssertionError("the parse waited")


ParseFn = Callable[[Any, bytes], Coroutine[Any, Any, None]]


def drive(chunks: list[bytes], parses: list[ParseFn]) -> tuple[list[tuple[Any, ...]], tuple[Any, ...], str | None]:
    """Feed the chunks (chunk i to parses[i % len]); the calls made, the state left, the error raised."""
    recorder = Recorder()
    parser = Parser(recorder)
    recorder.parser = parser
    error = None
    for i, chunk in enumerate(chunks):
        try:
            run(parses[i % len(parses)](parser, chunk))
        except Exception as exc:  # the client would reconnect; nothing more is parsed
            error = f"{type(exc).__name__}: {exc}"
            break
    # `needed` and `msg_arg` mean something only while a message's payload is awaited.
    pending = (parser.needed, dict(parser.msg_arg)) if parser.state == 2 else None
    return recorder.calls, (bytes(parser.buf), parser.state, parser.header_needed, pending), error


TOKEN = st.text("abcXYZ019_-$*>", min_size=1, max_size=8)
SUBJECT = st.lists(TOKEN, min_size=1, max_size=12).map(".".join).map(str.encode)
HEADER_LINE = st.sampled_from(
    [b"Nats-Msg-Id: x-1", b"spear-type: started", b"A:", b"B: \xe2\x82 v", b"Nats-Sequence: 12"]
)
STATUS = st.sampled_from([b"", b" 100 FlowControl Request", b" 100 Idle Heartbeat", b" 503", b" 408 Request Timeout"])


@st.composite
def header_block(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(HEADER_LINE, max_size=4))
    return b"NATS/1.0" + draw(STATUS) + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@st.composite
def message(draw: st.DrawFn) -> bytes:
    subject, sid, payload = draw(SUBJECT), draw(st.integers(0, 10**6)), draw(st.binary(max_size=40))
    reply = draw(st.one_of(st.just(b""), SUBJECT))
    spaced = reply + b" " if reply else b""
    if draw(st.booleans()):
        return b"MSG %s %d %s%d\r\n%s\r\n" % (subject, sid, spaced, len(payload), payload)
    hdr = draw(header_block())
    return b"HMSG %s %d %s%d %d\r\n%s%s\r\n" % (subject, sid, spaced, len(hdr), len(hdr) + len(payload), hdr, payload)


INFO = st.fixed_dictionaries(
    {"server_id": st.text(max_size=8), "connect_urls": st.lists(st.text("0123456789.:", max_size=12), max_size=3)}
).map(lambda info: b"INFO " + json.dumps(info).encode() + b"\r\n")
ERR = st.sampled_from([b"Permissions Violation for Subscription to x", b"Authorization Violation", b"Slow Consumer"])
FRAME = st.one_of(
    message(),
    st.sampled_from([b"+OK\r\n", b"PING\r\n", b"PONG\r\n", b"PING \r\n", b"+OK \r\n"]),
    ERR.map(lambda text: b"-ERR '" + text + b"'\r\n"),
    INFO,
)
# What a server does not send but nats-py's patterns read one way or another (or refuse).
ODD = st.sampled_from(
    [
        b"MSG\ta\t1\t3\r\nabc\r\n",
        b"MSG a  1 r  3\r\nabc\r\n",
        b"MSG a x 3\r\nabc\r\n",
        b"MSG a +1 3\r\nabc\r\n",
        b"HMSG a 1 2 4\r\n",  # then digits: nats-py reads on into the next line
        b"HMSG a 1 2 4\r\n12\r\n",
        b"HMSG a 1\t12 14\r\nNATS/1.0\r\n\r\nxy\r\n",
        b"HMSG a 1 12 5\r\nNATS/1.0\r\n\r\n",
        b"MSG a 1 r 0\r\n\r\n",
        b"-ERR 'Stale Connection'\r\n",  # the client resets the parser: what follows is void
        b"-ERR\r\n\r\n",
        b"-ERR 'x\r\n",
        b"INFO {bad\r\n",
        b"INFO \xff\r\n",
        b"FOO\r\n",
        b"PINGPONG\r\n",
        b"\r\n",
        b"MSG a 1 5\r\nab",
        b"12\r\n",
        b"  \r\n",
    ]
)


@st.composite
def traffic(draw: st.DrawFn, frame: st.SearchStrategy[bytes]) -> list[bytes]:
    blob = b"".join(draw(st.lists(frame, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=10)))
    return [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(traffic(FRAME))
def test_server_traffic_cut_anywhere_gives_what_nats_py_gives(chunks):
    expected = drive(chunks, [ORIGINAL])
    assert expected[2] is None
    assert drive(chunks, [wireparser.parse]) == expected
    # Installed while a connection is open: the two take turns, read after read.
    assert drive(chunks, [ORIGINAL, wireparser.parse]) == expected
    assert drive(chunks, [wireparser.parse, ORIGINAL]) == expected


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(traffic(st.one_of(FRAME, ODD, st.binary(max_size=12))))
def test_odd_traffic_gives_nats_py_s_calls_and_errors(chunks):
    assert drive(chunks, [wireparser.parse]) == drive(chunks, [ORIGINAL])


@pytest.mark.parametrize("cut", [None, 20, 30])
def test_subjects_that_are_not_utf8_are_handed_on_with_replacement_characters(cut):
    """nats-py would decode them strictly in the read loop and end it (one message stopped a
    gateway); spear's parser hands them on as text (on their own line or with their payload in
    a later read)."""
    frame = b"MSG a.\xff.b 7 _INBOX.\xfe\xfd 2\r\nhi\r\n"
    recorder = Recorder(as_utf8=False)
    parser = Parser(recorder)
    for chunk in [frame] if cut is None else [frame[:cut], frame[cut:]]:
        run(wireparser.parse(parser, chunk))
    [(_, sid, subject, reply, payload, *_)] = recorder.calls
    assert (sid, subject.decode(), reply.decode(), payload) == (7, "a.\ufffd.b", "_INBOX.\ufffd\ufffd", b"hi")
    assert wireparser.utf8("é.x".encode()) == "é.x".encode()  # UTF-8 as it is


def test_a_stale_connection_resets_the_parser_mid_read_and_the_rest_is_dropped():
    chunks = [b"PING\r\n-ERR 'Stale Connection'\r\nMSG a 1 2\r\nhi\r\nPONG\r\n"]
    calls, state, error = drive(chunks, [wireparser.parse])
    assert (calls, state, error) == drive(chunks, [ORIGINAL])
    assert calls == [("ping",), ("err", "'stale connection'")] and state == (b"", 1, 0, None) and error is None


def test_install_is_what_every_client_uses():
    wireparser.install()
    assert Parser.parse is wireparser.parse
    wireparser.install()  # twice is once
    assert wireparser.original() is ORIGINAL


async def test_a_real_connection_with_it_does_what_nats_py_does(nats_url):
    wireparser.install()
    nc = await nats.connect(nats_url)
    prefix = "wp" + uuid.uuid4().hex[:8]
    try:
        assert type(nc._ps).parse is wireparser.parse

        async def echo(msg: Any) -> None:
            await nc.publish(
                msg.reply, msg.data[::-1], headers={"Echo": msg.headers.get("X", "") if msg.headers else ""}
            )

        await nc.subscribe(f"{prefix}.echo", cb=echo)
        reply = await nc.request(f"{prefix}.echo", b"abc", timeout=5, headers={"X": "y z"})
        assert reply.data == b"cba" and reply.headers == {"Echo": "y z"}
        big = bytes(range(256)) * 2000  # 512 kB: many reads, cut anywhere
        assert (await nc.request(f"{prefix}.echo", big, timeout=5)).data == big[::-1]
        assert (await nc.request(f"{prefix}.echo", b"", timeout=5)).data == b""
        raw: asyncio.Queue[tuple[bytes, ...]] = asyncio.Queue()
        sub = await rawsub.subscribe_raw(nc, f"{prefix}.raw", lambda *parts: raw.put_nowait(parts))
        await nc.publish(f"{prefix}.raw", b"r", reply="re.ply", headers={"K": "v"})
        assert await asyncio.wait_for(raw.get(), 5) == (
            f"{prefix}.raw".encode(),
            b"re.ply",
            b"r",
            b"NATS/1.0\r\nK: v\r\n\r\n",
        )
        await sub.unsubscribe()
        with pytest.raises(nats.errors.NoRespondersError):  # a 503 status: headers, no payload
            await nc.request(f"{prefix}.nobody", b"x", timeout=5)

        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=prefix.upper(), subjects=[f"{prefix}.s.>"]))
        sent = [
            (f"{prefix}.s.{i % 3}.a.b.c.d", b"p%d" % i * (i % 50), {"Nats-Msg-Id": f"m{i}", "N": str(i)})
            for i in range(300)
        ]
        for subject, payload, hdrs in sent:
            await js.publish(subject, payload, headers=hdrs)
        got: asyncio.Queue[Any] = asyncio.Queue()
        ordered = await js.subscribe(f"{prefix}.s.>", ordered_consumer=True, cb=got.put)
        received = [await asyncio.wait_for(got.get(), 10) for _ in sent]
        await ordered.unsubscribe()
        assert [(m.subject, m.data, m.headers["N"]) for m in received] == [(s, p, h["N"]) for s, p, h in sent]
        pull = await js.pull_subscribe(f"{prefix}.s.1.>", durable="d")
        fetched = []
        while len(fetched) < 100:
            fetched += await pull.fetch(100, timeout=5)
        assert [m.data for m in fetched] == [p for s, p, _ in sent if s.startswith(f"{prefix}.s.1.")]
        await js.delete_stream(prefix.upper())
    finally:
        await nc.close()


def test_a_large_payload_arriving_in_many_reads_is_copied_once_it_is_whole(monkeypatch):
    """probe28: each read of a large payload's bytes copied all that had come before it (reading an
    8 MB state took 1.1 s, a 2 MB one 0.05). Now what comes is kept until the payload is whole."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    frame = b"MSG big.subject 7 _INBOX.r %d\r\n%s\r\nPING\r\n" % (len(payload), payload)
    chunks = [frame[i : i + 8192] for i in range(0, len(frame), 8192)]
    copies = []
    real = wireparser._arrived

    def counted(buf: bytearray, data: bytes) -> bytes:
        copies.append(len(buf))
        return real(buf, data)

    monkeypatch.setattr(wireparser, "_arrived", counted)
    calls, state, error = drive(chunks, [wireparser.parse])
    assert error is None and (calls, state) == drive(chunks, [ORIGINAL])[:2]  # as nats-py's parser has it
    assert calls[0][4] == payload and calls[-1] == ("ping",)
    assert len(copies) <= 2, len(copies)  # the read with the line, the read that completes it
