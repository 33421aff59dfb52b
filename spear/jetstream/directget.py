"""Batched direct gets: read many stored messages of a stream in one request-reply exchange.

The server answers a batch request with up to `batch` messages on our inbox, then an
end-of-batch status (204), or 404 when nothing matches. No consumer is created, so reads are
cheap and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from spear.core.eventstore import StoreUnavailable
from spear.jetstream import rawrequests, rawsub
from spear.jetstream.errors import UNREACHABLE, permission_denied

BATCH = 256

T = TypeVar("T")


class Found(msgspec.Struct, frozen=True):
    """One stored message, as a direct get (or the leader's get, `leaderget`) returned it."""

    subject: str
    seq: int
    data: bytes
    headers: dict[str, str]


def found(msg: Msg) -> Found:
    """A direct get's reply (not a status) as a Found."""
    headers = dict(msg.headers or {})
    return Found(headers.get("Nats-Subject", ""), sequence(msg), msg.data, headers)


async def read_batch(nc: Client, stream: str, subject_filter: str, start_seq: int, timeout: float) -> list[Msg]:
    """Up to BATCH stored messages matching `subject_filter`, from `start_seq` on."""
    # Replies go to a queue read under asyncio.timeout, not to `next_msg(timeout)`: that wraps a
    # task around wait_for, which on Python 3.11 loses a cancellation coming as a reply arrives
    # (a Ctrl-C or a closed SSE stream would then be ignored).
    replies: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        replies.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        request = msgspec.json.encode({"seq": start_seq, "next_by_subj": subject_filter, "batch": BATCH})
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
        found: list[Msg] = []
        while True:
            try:
                async with asyncio.timeout(timeout):
                    msg = await replies.get()
            except TimeoutError:
                subject = f"$JS.API.DIRECT.GET.{stream}"
                refused = permission_denied(nc, subject)
                raise StoreUnavailable(refused or f"JetStream did not answer a read of {stream}") from None
            if is_status(msg):
                return found
            found.append(msg)
    finally:
        await sub.unsubscribe()


async def read_all(nc: Client, stream: str, subject_filter: str, after_seq: int, timeout: float) -> AsyncIterator[Msg]:
    """Every stored message matching `subject_filter` after `after_seq`, in stream order."""
    start = after_seq + 1
    while True:
        batch = await read_batch(nc, stream, subject_filter, start, timeout)
        for msg in batch:
            yield msg
        if len(batch) < BATCH:
            return
        start = sequence(batch[-1]) + 1


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


def sequence(msg: Msg) -> int:
    """The stream sequence of a message a direct get returned."""
    assert msg.headers is not None  # a direct get always answers with headers
    return int(msg.headers["Nats-Sequence"])


def is_status(msg: Msg) -> bool:
    """A miss or an end of batch: a `Status` header and no data."""
    return bool(msg.headers and "Status" in msg.headers and not msg.data)
