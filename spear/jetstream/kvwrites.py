"""Pipelined compare-and-set writes to one KV bucket: a whole batch of writes in flight at once,
their replies gathered on one subscription.

nats-py's `kv.create`/`kv.update` await one request each (a fresh inbox token, a future and a
timer per write); the projection writes many states per batch, so it publishes them all and
waits once. Each write says the revision it expects (`Nats-Expected-Last-Subject-Sequence`, 0 for
a key that must not exist), so two writers never lose each other's updates. Rejections are
answered with an error reply, which is read here (nats-py's `publish_async` would never resolve
on one: ARCHITECTURE.md). The replies are taken raw (`spear.jetstream.rawsub`): each settles its
write from the connection's read loop, with no `Msg` made and no task woken, and the call is
woken once, when the last of its writes is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence

import msgspec
from nats.aio.client import Client

from spear.jetstream import hpub
from spear.jetstream.errors import WRONG_LAST_SEQUENCE
from spear.jetstream.rawsub import RawSubscription, subscribe_raw

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


class WrongRevision(Exception):
    """The key's revision is not the one the write expected: someone else wrote it."""


class WriteFailed(Exception):
    """The server refused the write (or nobody answered it)."""


class NoBucketLeader(WriteFailed):
    """Nothing took the write (a 503 status: the bucket's leader lost, being elected; or no such
    bucket): a passing state, mostly."""


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: _Error | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


class KvWriter:
    """Compare-and-set writes to the bucket `bucket`, pipelined; `start()` before use."""

    def __init__(self, nc: Client, bucket: str, timeout_s: float):
        self.nc = nc
        self.prefix = f"$KV.{bucket}."
        self.timeout_s = timeout_s
        self._inbox = nc.new_inbox()
        self._counter = itertools.count()
        self._waiting: dict[bytes, tuple[_Batch, int]] = {}  # by reply subject: its call's batch, its place
        self._sub: RawSubscription | None = None

    async def start(self) -> None:
        """Subscribe to the replies."""
        self._sub = await subscribe_raw(self.nc, f"{self._inbox}.*", self._reply)

    async def stop(self) -> None:
        """Stop listening; writes still waiting fail."""
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await self._sub.unsubscribe()
        for batch, index in self._waiting.values():
            batch.settle(index, WriteFailed("the writer stopped"))
        self._waiting.clear()

    async def write(self, writes: Sequence[tuple[str, bytes, int]]) -> list[int | BaseException]:
        """Write each (key, value, expected revision) (revision 0: the key must not exist); return,
        in order, each write's new revision or its error (WrongRevision, WriteFailed, TimeoutError).
        The writes are queued at once, without a coroutine each (`hpub.publish_now`), unless the
        connection's buffer is full (then each waits for its flush, as `publish` does)."""
        batch = _Batch(len(writes), asyncio.get_running_loop())
        tokens: list[bytes] = []
        try:
            for index, (key, value, last) in enumerate(writes):
                reply = f"{self._inbox}.{next(self._counter)}"
                tokens.append(reply.encode())
                self._waiting[tokens[-1]] = (batch, index)
                headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
                if hpub.crowded(self.nc) or not hpub.publish_now(self.nc, self.prefix + key, value, reply, headers):
                    await self.nc.publish(self.prefix + key, value, reply=reply, headers=headers)
            if writes:
                await asyncio.wait({batch.done}, timeout=self.timeout_s)
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        late = TimeoutError(f"no reply to a write within {self.timeout_s} s")
        return [late if outcome is None else outcome for outcome in batch.outcomes]

    def _reply(self, subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        waiting = self._waiting.pop(subject, None)
        if waiting is None:
            return  # late: its write was given up already
        batch, index = waiting
        batch.settle(index, _outcome(data, block))


class _Batch:
    """The outcomes of one `write` call's writes, and a future done once each has one."""

    __slots__ = ("done", "left", "outcomes")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.outcomes: list[int | BaseException | None] = [None] * size
        self.left = size
        self.done: asyncio.Future[None] = loop.create_future()

    def settle(self, index: int, outcome: int | BaseException) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.left -= 1
            if not self.left and not self.done.done():
                self.done.set_result(None)


def _outcome(data: bytes, block: bytes) -> int | BaseException:
    """What a write's reply says: its new revision, or why it was not written."""
    if not data:  # a status instead of a reply: 503 no responders (no such bucket)
        status = block.split(b"\r\n", 1)[0].removeprefix(b"NATS/1.0").strip().decode(errors="replace")
        return NoBucketLeader(f"no reply from the bucket (status {status})")
    try:
        ack = _decode_ack(data)
    except msgspec.DecodeError as exc:
        return WriteFailed(f"unreadable reply: {exc}")
    if ack.error is None:
        return ack.seq
    if ack.error.err_code in WRONG_LAST_SEQUENCE:
        return WrongRevision(ack.error.description)
    return WriteFailed(f"{ack.error.code}/{ack.error.err_code}: {ack.error.description}")
