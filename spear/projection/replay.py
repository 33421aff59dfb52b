"""A rebuild's replay: the stream read from its start by an ordered push consumer, every event
folded in memory, each execution's state written once.

The projection's durable pull consumer costs ~17 µs of nats-py and 15–20 µs of nats-server per
event (a pull request's share, a delivery, an explicit ack: performance.md). A rebuild has the
whole stream to read and nobody to share it with, so it reads it with an ephemeral push consumer
without acks (flow-controlled: the server waits for our reply to its flow-control requests, which
come in order with the messages, so it never sends faster than they are folded), and folds with
the same `apply`. An execution that has ended never changes again, so its state is handed to
`settle` as its terminal event is folded and forgotten: memory holds what is still running, not
the stream. What is still running at the end is settled too, and the projection's durable
consumer takes over right after the last sequence replayed (`Projection._catch_up`).

Nothing is acknowledged, so an interrupted replay leaves no trace but the states it wrote: the
next one starts again from the beginning, and settling is idempotent (each state carries the
stream sequence it has applied).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client

from spear.core.events import AnyEvent, BadEvent, decode_event
from spear.core.names import Names
from spear.core.state import ExecutionState, apply
from spear.jetstream import rawsub, topology

WINDOW = 1024  # ended states settled together (one pipelined batch of writes)
IN_FLIGHT = 2  # batches of writes awaiting their replies while the replay reads on
HEARTBEAT_S = 2.0  # the server's idle heartbeat (flow control requires one)
IDLE_S = 10.0  # nothing at all received for this long: the replay gives up (its caller retries)
# The ephemeral consumer is not deleted (the projection's role may delete only its durable): the
# server drops it this long after the replay stops listening.
INACTIVE_S = 5.0


class ReplayGap(Exception):
    """A message was missed (a reconnect, a slow consumer): this replay cannot be trusted."""


class Replay:
    """Folds every event stored up to now, settling states as they become final."""

    def __init__(
        self,
        nc: Client,
        names: Names,
        settle: Callable[[list[ExecutionState]], Coroutine[Any, Any, None]],
        on_bad: Callable[[int, str, BadEvent], None],
        timeout_s: float,
    ):
        self.nc = nc
        self.names = names
        self.settle = settle
        self.on_bad = on_bad  # an unreadable event: skipped and recorded, as the projection does
        self.timeout_s = timeout_s
        self.running: dict[str, ExecutionState] = {}  # folded, not ended: settled at the end
        self.ended: list[ExecutionState] = []  # final, not handed to `settle` yet
        self.replayed_seq = 0  # the last stream sequence folded
        self.events = 0
        self._last_seq = 0  # the stream's last sequence when the replay began: where it stops
        self._consumer_seq = 0
        self._writes: list[asyncio.Task[None]] = []
        self._done: asyncio.Future[None] | None = None
        self._last_seen = 0.0
        self._held = b""  # a flow-control request not answered yet
        self._loop = asyncio.get_running_loop()  # made by the projection's loop
        self._failure: BaseException | None = None  # of a batch of writes

    async def run(self) -> int:
        """Replay the stream as it is now; the last stream sequence replayed (0: nothing)."""
        try:
            return await self._run()
        except BaseException:
            for write in self._writes:  # a failed replay is started again from the beginning
                write.cancel()
            raise

    async def _run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        stream = self.names.stream
        info = await topology.api_request(self.nc, f"STREAM.INFO.{stream}", None, self.timeout_s)
        self._last_seq = int(info["state"]["last_seq"])
        if not info["state"]["messages"]:
            return 0
        self._done = loop.create_future()
        self._last_seen = loop.time()
        inbox = self.nc.new_inbox()
        sub = await rawsub.subscribe_raw(self.nc, inbox, self._receive)
        try:
            config = {
                "deliver_subject": inbox,
                "deliver_policy": "all",
                "ack_policy": "none",
                "filter_subject": topology.load_config("projection.consumer.json", self.names)["filter_subject"],
                "flow_control": True,
                "idle_heartbeat": int(HEARTBEAT_S * 1e9),
                "replay_policy": "instant",
                "mem_storage": True,
                "num_replicas": 1,
                "inactive_threshold": int(INACTIVE_S * 1e9),  # gone by itself once we unsubscribe
            }
            request = {"stream_name": stream, "config": config}
            created = await topology.api_request(self.nc, f"CONSUMER.CREATE.{stream}", request, self.timeout_s)
            if not created.get("num_pending"):
                self._finish()
            while not self._done.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._done), IDLE_S / 4)
                if loop.time() - self._last_seen > IDLE_S and not self._done.done():
                    raise TimeoutError(f"replay: nothing received for {IDLE_S:g} s")
            await self._done
        finally:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await sub.unsubscribe()
        self.ended += self.running.values()
        self.running.clear()
        self._flush()
        await asyncio.gather(*self._writes)  # raises the first failure
        if self._failure is not None:
            raise self._failure
        return self.replayed_seq

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def _receive(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        # Called inside the connection's read loop (`rawsub.py`): what it raises is reported
        # through `_done`, never to nats-py.
        try:
            self._take(subject, reply, data, headers)
        except Exception as exc:
            self._fail(exc)

    def _take(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        self._last_seen = self._loop.time()
        if not data and headers.startswith(b"NATS/1.0 "):  # a status: flow control or heartbeat
            # Flow control asks for an empty reply (a heartbeat may name one that stalled). It is
            # held while IN_FLIGHT batches of writes are outstanding: the server waits meanwhile.
            answer = reply or _stalled(headers)
            if answer:
                self._held = answer
                self._answer()
            return
        if self._done is None or self._done.done():
            return  # past the end: the durable consumer delivers these
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or two tokens
        # more after ACK (domain, account hash) and one at the end
        tokens = reply.split(b".")
        at = 5 if len(tokens) == 9 else 7
        seq, consumer_seq, pending = int(tokens[at]), int(tokens[at + 1]), int(tokens[at + 3])
        if consumer_seq != self._consumer_seq + 1:
            raise ReplayGap(f"message {self._consumer_seq + 1} of the replay missed (got {consumer_seq})")
        self._consumer_seq = consumer_seq
        try:
            event = decode_event(data, subject.decode())
        except BadEvent as exc:
            self.on_bad(seq, subject.decode(errors="replace"), exc)
        else:
            self._fold(event, seq)
        self.replayed_seq = seq
        self.events += 1
        if seq >= self._last_seq or pending == 0:
            self._finish()
        elif len(self.ended) >= WINDOW:
            self._flush()

    def _fold(self, event: AnyEvent, seq: int) -> None:
        execution_id = event.execution_id
        state = apply(self.running.get(execution_id), event, seq)
        if state is None:
            return  # nothing known of it yet (its `requested` is not in the stream), or ended before
        if state.terminal:  # `running` holds no ended state: this one ended just now
            self.running.pop(execution_id, None)
            self.ended.append(state)
        else:
            self.running[execution_id] = state

    def _flush(self) -> None:
        """Settle what has ended (a batch of writes, not awaited here)."""
        if self.ended:
            ended, self.ended = self.ended, []
            write = self._loop.create_task(self.settle(ended))
            self._writes.append(write)
            write.add_done_callback(self._written)

    def _written(self, write: asyncio.Task[None]) -> None:
        if write in self._writes:
            self._writes.remove(write)
        if not write.cancelled() and write.exception() is not None:
            self._failure = write.exception()
            self._fail(self._failure)  # type: ignore[arg-type]  # set just before
        self._answer()

    def _answer(self) -> None:
        """Answer the held flow-control request, unless IN_FLIGHT batches of writes are outstanding."""
        if self._held and len(self._writes) < IN_FLIGHT:
            answer, self._held = self._held, b""
            self._loop.create_task(self.nc.publish(answer.decode(), b""))


def _stalled(headers: bytes) -> bytes:
    """The flow-control subject a heartbeat names as stalled (`Nats-Consumer-Stalled`), or b""."""
    at = headers.find(b"Nats-Consumer-Stalled:")
    if at < 0:
        return b""
    return headers[at + len(b"Nats-Consumer-Stalled:") :].split(b"\r\n", 1)[0].strip()
