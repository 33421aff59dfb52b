"""Pipelined compare-and-set writes to one KV bucket: a whole batch of writes in flight at once,
their replies gathered on one subscription.

nats-py's `kv.create`/`kv.update` await one request each (a fresh inbox token, a future and a
timer per write); the projection writes many states per batch, so it publishes them all and
waits once. Each write says the revision it expects (`Nats-Expected-Last-Subject-Sequence`, 0 for
a key that must not exist), so two writers never lose each other's updates. Rejections are
answered with an error reply, which is read here (nats-py's `publish_async` would never resolve
on one: ARCHITECTURE.md). The replies are taken raw (`spear.jetstream.rawsub`): each resolves its
write's future from the connection's read loop, with no `Msg` made and no task woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence

import msgspec
from nats.aio.client import Client

from spear.jetstream.errors import WRONG_LAST_SEQUENCE
from spear.jetstream.rawsub import RawSubscription, subscribe_raw

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


class WrongRevision(Exception):
    """The key's revision is not the one the write expected: someone else wrote it."""


class WriteFailed(Exception):
    """The server refused the write (or nobody answered it)."""


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
        self._waiting: dict[bytes, asyncio.Future[int]] = {}  # by reply subject
        self._sub: RawSubscription | None = None

    async def start(self) -> None:
        """Subscribe to the replies."""
        self._sub = await subscribe_raw(self.nc, f"{self._inbox}.*", self._reply)

    async def stop(self) -> None:
        """Stop listening; writes still waiting fail."""
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await self._sub.unsubscribe()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WriteFailed("the writer stopped"))
        self._waiting.clear()

    async def write(self, writes: Sequence[tuple[str, bytes, int]]) -> list[int | BaseException]:
        """Write each (key, value, expected revision) (revision 0: the key must not exist); return,
        in order, each write's new revision or its error (WrongRevision, WriteFailed, TimeoutError)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[int]] = []
        tokens: list[bytes] = []
        for key, value, last in writes:
            token = f"{self._inbox}.{next(self._counter)}"
            future: asyncio.Future[int] = loop.create_future()
            self._waiting[token.encode()] = future
            futures.append(future)
            tokens.append(token.encode())
            await self.nc.publish(
                self.prefix + key, value, reply=token, headers={EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
            )
        if futures:
            await asyncio.wait(futures, timeout=self.timeout_s)
        outcomes: list[int | BaseException] = []
        for waiting, future in zip(tokens, futures, strict=True):
            self._waiting.pop(waiting, None)
            if not future.done():
                future.cancel()
                outcomes.append(TimeoutError(f"no reply to a write within {self.timeout_s} s"))
            elif future.cancelled():
                outcomes.append(WriteFailed("cancelled"))
            else:
                outcomes.append(future.exception() or future.result())
        return outcomes

    def _reply(self, subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        future = self._waiting.pop(subject, None)
        if future is None or future.done():
            return  # late: its write was given up already
        if not data:  # a status instead of a reply: 503 no responders (no such bucket)
            status = block.split(b"\r\n", 1)[0].removeprefix(b"NATS/1.0").strip().decode(errors="replace")
            future.set_exception(WriteFailed(f"no reply from the bucket (status {status})"))
            return
        try:
            ack = _decode_ack(data)
        except msgspec.DecodeError as exc:
            future.set_exception(WriteFailed(f"unreadable reply: {exc}"))
            return
        if ack.error is None:
            future.set_result(ack.seq)
        elif ack.error.err_code in WRONG_LAST_SEQUENCE:
            future.set_exception(WrongRevision(ack.error.description))
        else:
            future.set_exception(WriteFailed(f"{ack.error.code}/{ack.error.err_code}: {ack.error.description}"))
