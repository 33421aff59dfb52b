"""Batched direct gets: read many stored messages of a stream in one request-reply exchange.

The server answers a batch request with up to `batch` messages on our inbox, then an
end-of-batch status (204), or 404 when nothing matches. No consumer is created, so reads are
cheap and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client

from spear.core.eventstore import StoreUnavailable
from spear.jetstream import rawrequests, rawsub
from spear.jetstream.errors import UNREACHABLE, permission_denied
from spear.jetstream.headers import parse_header_lines

BATCH = 256

T = TypeVar("T")


class Found(msgspec.Struct, frozen=True):
    """One stored message, as a direct get (or the leader's get, `leaderget`) returned it."""

    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]


BATCH_BYTES = 4 * 1024 * 1024  # a batch's bytes, at most: the server stops there and says how many are left


class Batch(NamedTuple):
    """What one batched direct get returned, and how many more messages match after it
    (`Nats-Num-Pending` of the end-of-batch status: the server stopped at its count or byte limit)."""

    found: list[Found]
    pending: int

    @property
    def more(self) -> bool:
        """Whether more messages match than this batch holds."""
        return self.pending > 0


async def read_batch(
    nc: Client,
    stream: str,
    subject_filter: str,
    start_seq: int,
    timeout: float,
    count: int = BATCH,
    max_bytes: int = BATCH_BYTES,
) -> Batch:
    """Up to `count` (at most BATCH) stored messages matching `subject_filter` (`>`: any), from
    `start_seq` on, up to about `max_bytes` of them (at most BATCH_BYTES)."""
    request: dict[str, object] = {
        "seq": start_seq,
        "batch": min(count, BATCH),
        "max_bytes": min(max_bytes, BATCH_BYTES),
    }
    if subject_filter != ">":  # (the server reads twice as fast without a filter to match)
        request["next_by_subj"] = subject_filter
    return await read_request(nc, stream, request, timeout)


async def newest_of(nc: Client, stream: str, subjects: list[str], timeout: float) -> list[Found]:
    """The newest stored message of each of `subjects` that has one (`multi_last`), in stream
    order within each request: asked again for those not answered while the server says there
    are more (a batch stops at BATCH messages or BATCH_BYTES)."""
    found: list[Found] = []
    for start in range(0, len(subjects), BATCH):
        remaining = subjects[start : start + BATCH]
        while remaining:
            batch = await read_request(nc, stream, {"multi_last": remaining, "batch": BATCH}, timeout)
            found += batch.found
            if not batch.more or not batch.found:
                break
            answered = {message.subject for message in batch.found}
            remaining = [subject for subject in remaining if subject not in answered]
    return found


async def read_request(nc: Client, stream: str, request: dict[str, object], timeout: float) -> Batch:
    """The stored messages a batched direct get `request` returns (at most BATCH_BYTES of them,
    or the request's own `max_bytes`).

    The replies are taken raw (`rawsub`) and kept as bytes until the end-of-batch status, then
    read: nats-py would build, queue and hand over a `Msg` for each (most of a scan's CPU). The
    end is a 204 (its `Nats-Num-Pending` says whether more match) or a 404 (nothing matches); any
    other status (503: no stream or no leader; 408, 413, ...) is StoreUnavailable, never an empty read."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[bytes] = loop.create_future()
    received: list[tuple[bytes, bytes]] = []

    def on_reply(subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        if ended.done():
            return
        if status_of(data, block) is not None:  # `NATS/1.0 204 EOB`, `404`, ...: the end
            ended.set_result(block)
        else:
            received.append((data, block))

    subject = f"$JS.API.DIRECT.GET.{stream}"
    sub = await rawsub.subscribe_raw(nc, nc.new_inbox(), on_reply)
    try:
        body = msgspec.json.encode({"max_bytes": BATCH_BYTES, **request})
        await nc.publish(subject, body, reply=sub.sub.subject)
        while not ended.done():  # `timeout` is how long it may go without a message
            seen = len(received)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(ended)
            except TimeoutError:
                if len(received) == seen:
                    refused = permission_denied(nc, subject)
                    raise StoreUnavailable(refused or f"JetStream did not answer a read of {stream}") from None
    finally:
        await sub.unsubscribe()
    status = ended.result()
    code = status_of(b"", status)
    if code not in (b"204", b"404"):
        raise StoreUnavailable(f"a read of {stream} was answered with status {_said(status)}")
    pending = int(parse_header_lines(status).get("Nats-Num-Pending") or 0) if code == b"204" else 0
    return Batch([found_of(data, block) for data, block in received], pending)


def status_of(data: bytes, block: bytes) -> bytes | None:
    """The status code of a reply that is a status (`NATS/1.0 404 Message Not Found`: no data, and
    the first line goes on after `NATS/1.0`), None for a stored message."""
    return block[9:12] if not data and block[8:9] == b" " else None


def _said(block: bytes) -> str:
    return block[9:].split(b"\r", 1)[0].decode("utf-8", "replace")


def found_of(data: bytes, block: bytes) -> Found:
    """A stored message from a direct get's raw reply. Its block is `NATS/1.0` and its headers
    (not a status): the header lines are all there is to read (the first has no colon)."""
    headers = parse_header_lines(block)
    return Found(headers.get("Nats-Subject", ""), int(headers.get("Nats-Sequence") or 0), data, headers)


async def newest(nc: Client, stream: str, subject_filter: str, timeout: float) -> Found | None:
    """The newest stored message matching `subject_filter` (one raw direct get), None if none."""
    return await _one(nc, stream, f"$JS.API.DIRECT.GET.{stream}.{subject_filter}", b"", timeout)


async def oldest(nc: Client, stream: str, subject_filter: str, timeout: float) -> Found | None:
    """The oldest stored message matching `subject_filter` (one raw direct get), None if none."""
    body = msgspec.json.encode({"seq": 1, "next_by_subj": subject_filter})
    return await _one(nc, stream, f"$JS.API.DIRECT.GET.{stream}", body, timeout)


async def _one(nc: Client, stream: str, request: str, body: bytes, timeout: float) -> Found | None:
    try:
        data, block = await rawrequests.request(nc, request, body, timeout)
    except UNREACHABLE as exc:
        refused = permission_denied(nc, request)
        raise StoreUnavailable(
            refused or f"JetStream did not answer a read of {stream}: {type(exc).__name__}"
        ) from None
    code = status_of(data, block)
    if code == b"404":  # nothing stored on it
        return None
    if code is not None:  # 503: no stream, or no leader; 408, ...
        raise StoreUnavailable(f"a read of {stream} was answered with status {_said(block)}")
    return found_of(data, block)


async def read_all(
    nc: Client, stream: str, subject_filter: str, after_seq: int, timeout: float
) -> AsyncIterator[Found]:
    """Every stored message matching `subject_filter` after `after_seq`, in stream order."""
    start = after_seq + 1
    while True:
        batch = await read_batch(nc, stream, subject_filter, start, timeout)
        for msg in batch.found:
            yield msg
        if not batch.more or not batch.found:
            return
        start = batch.found[-1].seq + 1


async def kv_value(nc: Client, bucket: str, key: str, timeout: float) -> bytes | None:
    """A KV entry's current value read as one direct get of its bucket's stream (nats-py's
    `KeyValue.get` does the same with several times the CPU), None if absent or deleted. The
    reply is taken raw (`rawrequests`): its header block is parsed only when it may say
    something (a status or a delete marker), otherwise a found entry's value is its payload."""
    return await _kv_read(nc, bucket, key, timeout, functools.partial(value_of, nc))


async def _kv_read(
    nc: Client, bucket: str, key: str, timeout: float, read: Callable[[rawrequests.RawReply], Awaitable[T]]
) -> T:
    """`read` of the raw reply to a direct get of a KV entry; StoreUnavailable if nothing answers."""
    request = f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"
    try:
        return await read(await rawrequests.request(nc, request, b"", timeout))
    except UNREACHABLE as exc:
        refused = permission_denied(nc, request)
        raise StoreUnavailable(
            refused or f"JetStream did not answer a read of KV_{bucket}: {type(exc).__name__}"
        ) from None


async def kv_entry(nc: Client, bucket: str, key: str, timeout: float) -> tuple[bytes | None, int]:
    """A KV entry's value and revision, as `KeyValue.get` reads them, from one raw direct get:
    (value, revision) of an entry, (None, revision) of a delete or purge marker or an empty value
    (a write over it names that revision), (None, 0) of a key never written. For compare-and-set
    writers."""

    async def entry(reply: rawrequests.RawReply) -> tuple[bytes | None, int]:
        data, block = reply
        headers = await rawsub.parsed_headers(nc, block) or {}
        status = headers.get("Status")
        if not data and status == "404":
            return None, 0  # a miss
        if not data and status is not None:  # 503: nothing answers; 408, 400, ...: refused
            raise StoreUnavailable(f"a read of KV_{bucket} was answered with status {status}")
        revision = int(headers.get("Nats-Sequence") or 0)
        return (None if "KV-Operation" in headers else data or None), revision

    return await _kv_read(nc, bucket, key, timeout, entry)


async def value_of(nc: Client, reply: rawrequests.RawReply) -> bytes | None:
    """A KV direct get's reply as `kv_value` reads it: what nats-py's `Msg` would give, read
    and checked as `kv_value` did before (tests/test_rawrequests.py compares both on any header block)."""
    data, block = reply
    # nats-py reads a status where the first line goes on after `NATS/1.0` with a space; a
    # `Status` or `KV-Operation` header needs its name in the block: without them, no parse.
    if block[8:9] == b" " or b"Status" in block or b"KV-Operation" in block:
        headers = await rawsub.parsed_headers(nc, block) or {}
        if not data and headers.get("Status") == "503":
            raise nats.errors.NoRespondersError  # as `requests` raises it: nothing answers
        if not data and "Status" in headers:
            return None  # a miss
        if "KV-Operation" in headers:
            return None  # a delete or purge marker
    return data or None
