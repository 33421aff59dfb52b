"""A KV read taken raw (`directget.kv_value` over `rawrequests`) against what it replaces: a
direct get answered as nats-py's `Msg` (`requests.request`) and checked as `kv_value` did. On any
header block the two give the same value, miss or error; on a real server they read the same
entries, deletes, purges and misses."""

from __future__ import annotations

import asyncio
import uuid

import nats
import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from spear.core.eventstore import StoreUnavailable
from spear.core.names import Names
from spear.jetstream import directget, headers, rawrequests, requests
from spear.jetstream.rawrequests import RawReply
from spear.jetstream.topology import ensure_base


async def old_value_of(nc: Client, data: bytes, block: bytes) -> bytes | None:
    """What the replaced path made of a reply: nats-py parses the header block into the `Msg`
    (`Client._process_msg`), `requests` turns a 503 into NoRespondersError, `last_on_subject`
    a status into None, `kv_value` a delete marker or an empty value into None."""
    parsed = await nc._process_headers(block) if block else None
    msg = Msg(nc, subject="_INBOX.x.1", data=data, headers=parsed)
    if not msg.data and msg.headers and msg.headers.get("Status") == "503":
        raise nats.errors.NoRespondersError
    if msg.headers and "Status" in msg.headers and not msg.data:  # a miss
        return None
    if not msg.data or (msg.headers and "KV-Operation" in msg.headers):
        return None
    return msg.data


status_lines = st.sampled_from(
    ["", " 404", " 503", " 404 Message Not Found", " 408 Request Timeout", " 100 Idle Heartbeat", " abc", "  503"]
)
header_lines = st.one_of(
    st.sampled_from(
        [
            "Nats-Stream: KV_b",
            "Nats-Subject: $KV.b.k",
            "Nats-Sequence: 12",
            "Nats-Time-Stamp: 2026-11-30T17:00:00.1Z",
            "KV-Operation: DEL",
            "KV-Operation: PURGE",
            "KV-Operation :DEL",
            " KV-Operation: DEL",
            "KV-Operation",
            "Status: 404",
            "Status: 503",
            "X-Status: 1",
            "Nats-Rollup: sub",
            "bad name: x",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()) and draw(st.booleans()):
        return b""
    lines = draw(st.lists(header_lines, max_size=6))
    return ("NATS/1.0" + draw(status_lines) + "\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


@settings(max_examples=400, deadline=None)
@given(block=header_blocks(), data=st.sampled_from([b"", b"{}", b'{"state":1}', b"KV-Operation"]))
def test_a_raw_reply_reads_as_the_msg_path_read_it(block: bytes, data: bytes) -> None:
    async def both() -> None:
        headers.install()  # as connect() does: the parser every spear connection uses
        nc = Client()
        try:
            expected: bytes | type[Exception] | None = await old_value_of(nc, data, block)
        except nats.errors.NoRespondersError:
            expected = nats.errors.NoRespondersError
        try:
            got: bytes | type[Exception] | None = await directget.value_of(nc, RawReply(data, block))
        except nats.errors.NoRespondersError:
            got = nats.errors.NoRespondersError
        assert got == expected

    asyncio.run(both())


async def test_kv_value_reads_entries_deletes_purges_and_misses_as_the_msg_path(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    names = Names("t" + uuid.uuid4().hex[:10])
    await ensure_base(nc, names)  # the state bucket as spear makes it (direct get allowed)
    bucket = names.state_bucket
    kv = await js.key_value(bucket)
    await kv.put("present", b'{"v":1}')
    await kv.put("empty", b"")
    await kv.put("deleted", b"x")
    await kv.delete("deleted")
    await kv.put("purged", b"y")
    await kv.purge("purged")
    await kv.put("again", b"z")
    await kv.delete("again")
    await kv.put("again", b"back")
    try:
        for key in ["present", "empty", "deleted", "purged", "again", "never"]:
            subject = f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"
            msg = await requests.request(nc, subject, b"", 2.0)
            old = await old_value_of(nc, msg.data, raw_block(msg))
            new = await directget.kv_value(nc, bucket, key, 2.0)
            assert new == old, key
        assert await directget.kv_value(nc, bucket, "present", 2.0) == b'{"v":1}'
        for key in ["present", "empty", "deleted", "purged", "again", "never"]:  # the entry, as KeyValue.get
            try:
                entry = await kv.get(key)
                expected: tuple[bytes | None, int] = (entry.value, entry.revision or 0)
            except KeyNotFoundError as exc:  # a marker too (nats-py turns KeyDeletedError into this), with its entry
                expected = (None, (exc.entry.revision or 0) if exc.entry is not None else 0)
            assert await directget.kv_entry(nc, bucket, key, 2.0) == expected, key
        assert (await directget.kv_entry(nc, bucket, "deleted", 2.0))[1] > 0  # a marker has its revision
        with pytest.raises(StoreUnavailable):
            await directget.kv_entry(nc, "nobucket" + uuid.uuid4().hex[:6], "k", 2.0)
        assert await directget.kv_value(nc, bucket, "again", 2.0) == b"back"
        with pytest.raises(StoreUnavailable):  # no such stream: nothing answers (503), as before
            await directget.kv_value(nc, "nobucket" + uuid.uuid4().hex[:6], "k", 2.0)
        assert rawrequests.pending(nc) == 0  # every answered request forgot its future
    finally:
        for stream in (names.stream, f"KV_{bucket}", f"KV_{names.tasks_bucket}", names.registry_stream):
            await js.delete_stream(stream)
        await nc.close()


def raw_block(msg: Msg) -> bytes:
    """The header block the server sent, from a Msg (for the oracle on a real reply)."""
    if not msg.headers:
        return b""
    status = msg.headers.get("Status")
    first = f"NATS/1.0 {status} {msg.headers.get('Description', '')}".rstrip() if status else "NATS/1.0"
    lines = [f"{k}: {v}" for k, v in msg.headers.items() if k not in ("Status", "Description")]
    return ("\r\n".join([first, *lines]) + "\r\n\r\n").encode()


async def test_a_raw_request_nobody_answers_in_time_times_out_and_is_forgotten(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    sub = await nc.subscribe("silent." + uuid.uuid4().hex)  # heard, never answered
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await rawrequests.request(nc, sub.subject, b"", 0.05)
        assert rawrequests.pending(nc) == 0
    finally:
        await nc.close()
