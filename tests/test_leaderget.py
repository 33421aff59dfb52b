"""Reads answered by the stream's leader (`leaderget`, used where streams are replicated) find
what a direct get finds: the same subject, sequence, payload and headers; None where nothing
matches; a missing stream is a store error."""

from __future__ import annotations

import uuid

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from spear.core.eventstore import StoreError, StoreUnavailable
from spear.jetstream import directget, leaderget, requests


async def test_leader_reads_find_what_direct_gets_find(client: Client) -> None:
    js = client.jetstream()
    name = "LG" + uuid.uuid4().hex[:8]
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True))
    try:
        for n in range(4):
            await js.publish(f"{name}.a.{n % 2}", b'{"n":%d}' % n, headers={"traceparent": f"00-{n}", "X-N": str(n)})
        await js.publish(f"{name}.b", b"")
        for subject in [f"{name}.a.0", f"{name}.a.1", f"{name}.a.>", f"{name}.b", f"{name}.c"]:
            reply = await requests.request(client, f"$JS.API.DIRECT.GET.{name}.{subject}", b"", 2.0)
            direct = None if reply.headers and "Status" in reply.headers and not reply.data else msg_found(reply)
            leader = await leaderget.last_by_subject(client, name, subject, 2.0)
            assert same(leader, direct), subject
        for seq in range(1, 7):
            batch = (await directget.read_batch(client, name, f"{name}.a.>", seq, 2.0)).found
            direct = batch[0] if batch else None
            leader = await leaderget.next_by_subject(client, name, f"{name}.a.>", seq, 2.0)
            assert same(leader, direct), seq
        with pytest.raises(StoreError):
            await leaderget.last_by_subject(client, name + "X", f"{name}.a.>", 2.0)
    finally:
        await js.delete_stream(name)


def same(leader: directget.Found | None, direct: directget.Found | None) -> bool:
    """Equal, but for the headers only a direct get adds (Nats-Stream, Nats-Subject, ...)."""
    if leader is None or direct is None:
        return leader is direct
    stored = {k: v for k, v in direct.headers.items() if not k.startswith("Nats-")}
    return (leader.subject, leader.seq, leader.data, leader.headers) == (
        direct.subject,
        direct.seq,
        direct.data,
        stored,
    )


async def test_a_raw_batch_read_finds_what_single_direct_gets_find(client: Client) -> None:
    """`read_batch` takes its replies raw: each is the subject, sequence, payload and headers that
    nats-py's `Msg` of a direct get by sequence gives, empty payloads and KV markers included, and
    a read spanning several batches (`read_all`) misses none and repeats none."""
    js = client.jetstream()
    name = "RB" + uuid.uuid4().hex[:8]
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True))
    try:
        count = directget.BATCH + 20
        for n in range(count):
            headers = {"KV-Operation": "DEL"} if n % 7 == 3 else {"X-N": str(n), "traceparent": f"00-{n}"}
            await js.publish(f"{name}.a.{n % 3}", b"" if n % 5 == 0 else b'{"n":%d}' % n, headers=headers)
        await js.publish(f"{name}.b", b"other")
        found = [msg async for msg in directget.read_all(client, name, f"{name}.a.>", 0, 2.0)]
        assert [msg.seq for msg in found] == list(range(1, count + 1))
        for msg in found[:40] + found[-20:]:
            request = b'{"seq":%d}' % msg.seq
            single = msg_found(await requests.request(client, f"$JS.API.DIRECT.GET.{name}", request, 2.0))
            batch_only = {"Nats-Num-Pending", "Nats-Last-Sequence"}  # what a batch reply adds
            assert msg.headers.keys() - single.headers.keys() == batch_only
            headers = {k: v for k, v in msg.headers.items() if k not in batch_only}
            assert (msg.subject, msg.seq, msg.data, headers) == (
                single.subject,
                single.seq,
                single.data,
                single.headers,
            )
        assert await directget.read_batch(client, name, f"{name}.c", 1, 2.0) == ([], False)  # 404: none
    finally:
        await js.delete_stream(name)


async def test_batches_cut_short_by_the_servers_byte_limit_are_read_on_to_the_end(client: Client) -> None:
    """A batch stops at BATCH_BYTES (the server's own limit if none is asked for), whatever its
    count: the end-of-batch status says more are left, and they are read. Messages of 200 KB,
    8 MB in all: taking a short batch for the end skipped more than half of them."""
    js = client.jetstream()
    name = "BB" + uuid.uuid4().hex[:8]
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True, max_msg_size=-1))
    try:
        big = b"x" * 200_000
        for n in range(40):
            await js.publish(f"{name}.k.{n}", big + str(n).encode())
        first = await directget.read_batch(client, name, f"{name}.k.>", 1, 5.0)
        assert first.more and len(first.found) < 40  # (so the read below has to go on)
        found = [msg async for msg in directget.read_all(client, name, f"{name}.k.>", 0, 5.0)]
        assert [msg.seq for msg in found] == list(range(1, 41))
        newest = await directget.newest_of(client, name, [f"{name}.k.{n}" for n in range(40)], 5.0)
        assert sorted(msg.seq for msg in newest) == list(range(1, 41))
    finally:
        await js.delete_stream(name)


async def test_a_refusing_status_is_an_unavailable_store_never_an_empty_read(client: Client) -> None:
    """503 (no such stream, or no leader), 408 and the like are not "nothing stored": a list or
    a scan that took them for it answered an empty page, or every execution PENDING."""
    missing = "NOSTREAM" + uuid.uuid4().hex[:8]
    with pytest.raises(StoreUnavailable):
        await directget.read_batch(client, missing, f"{missing}.>", 1, 2.0)
    with pytest.raises(StoreUnavailable):
        await directget.newest_of(client, missing, [f"{missing}.a"], 2.0)


def msg_found(msg) -> directget.Found:
    """A direct get's reply as nats-py's `Msg` path reads it (the reference for the raw reads)."""
    headers = dict(msg.headers or {})
    return directget.Found(headers.get("Nats-Subject", ""), int(headers["Nats-Sequence"]), msg.data, headers)
