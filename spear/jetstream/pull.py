"""A callback-driven JetStream pull consumer that keeps up to `capacity` messages in hand.

It issues its own pull requests to a private inbox instead of looping on `fetch()`, which waits
for the end of each pull request after the first message (ARCHITECTURE.md): a message is handed
over the moment it arrives. Credits count the messages asked for and not yet delivered; expired
requests give theirs back (status 408 with `Nats-Pending-Messages`), and a watchdog re-asks when
no heartbeat arrives (a lost request, a reconnect, a restarted server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from spear.jetstream.connection import on_reconnect

log = logging.getLogger(__name__)

NO_RESPONDERS_RETRY_S = 0.1


def stream_sequence(msg: Msg) -> int:
    """The stream sequence of a JetStream message, read from its ack subject without parsing the
    rest of its metadata (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`, or the form with
    domain and account hash, two tokens more)."""
    tokens = (msg.reply or "").split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class PullConsumer:
    """Hands each message of a durable pull consumer to `on_message` as it arrives; the handler
    calls `done()` when finished with it."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        on_message: Callable[[Msg], None] | None,
        capacity: int,
        expires_s: float = 30.0,
        # A request held by a consumer leader that dies gets no answer at all: the watchdog notices
        # the missing heartbeats (2.5 of them) and asks again, so this bounds a stall after a node loss.
        heartbeat_s: float = 1.0,
    ):
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.on_message = on_message
        self.capacity = capacity
        self.expires_ns = int(expires_s * 1e9)
        self.heartbeat_s = heartbeat_s
        self.in_hand = 0  # delivered, not yet done
        self.credits = 0  # asked for, not yet delivered
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_seen = 0.0
        self._stopped = False
        self._sending: set[asyncio.Task[None]] = set()  # pull requests being published

    async def start(self) -> None:
        """Subscribe to the private inbox and send the first pull request."""
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._receive)
        self._watchdog = loop.create_task(self._watch())
        on_reconnect(self.nc, self._renew)
        self._ask()

    def _renew(self) -> None:
        """After a reconnect the server may not know our pull requests any more: ask anew."""
        self.credits = 0
        self._ask()

    async def stop(self) -> None:
        """Stop asking for more. Messages already on their way (up to a round trip) are handed
        straight back (nak), so another consumer gets them now rather than after the ack wait;
        messages in hand are left to their handlers."""
        self._stopped = True
        if self._watchdog:
            self._watchdog.cancel()
        if self._sub:
            try:
                await self.nc.flush()
                await self._sub.unsubscribe()
            except Exception:  # the connection may be closing already
                pass

    def done(self, count: int = 1) -> None:
        """A handler finished with `count` messages: their slots can be refilled."""
        self.in_hand -= count
        self._ask()

    async def _receive(self, msg: Msg) -> None:
        self._last_seen = asyncio.get_running_loop().time()
        if not msg.data and msg.headers and "Status" in msg.headers:
            self._on_status(msg.headers)
            return
        self.credits = max(0, self.credits - 1)
        if self._stopped:
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self.in_hand += 1
        if self.on_message is not None:
            self.on_message(msg)

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers["Status"]
        if status == "100":  # idle heartbeat: the request is alive
            return
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            self.credits = max(0, self.credits - int(pending))
        elif status in ("408", "409"):
            self.credits = 0  # a request ended without saying how much was left
        elif status == "503":
            # No responders: the request never reached the consumer (a replicated one whose new
            # leader is not listening yet). Its credits are void; ask again shortly, not in a loop.
            log.debug("pull %s: no responders yet; asking again", self.subject)
            self.credits = 0
            asyncio.get_running_loop().call_later(NO_RESPONDERS_RETRY_S, self._ask)
            return
        else:
            log.warning("pull %s: status %s %s", self.subject, status, headers.get("Description", ""))
        self._ask()

    def _ask(self) -> None:
        if self._stopped or self.nc.is_closed:
            return
        want = self.capacity - self.in_hand - self.credits
        # Ask in chunks, not one message at a time, unless nothing at all is outstanding.
        if want <= 0 or (self.credits > 0 and want < max(1, self.capacity // 4)):
            return
        self.credits += want
        body = msgspec.json.encode(
            {"batch": want, "expires": self.expires_ns, "idle_heartbeat": int(self.heartbeat_s * 1e9)}
        )
        sending = asyncio.get_running_loop().create_task(self._publish(body))
        self._sending.add(sending)  # held until done: the loop keeps only weak references to tasks
        sending.add_done_callback(self._sending.discard)

    async def _publish(self, body: bytes) -> None:
        try:
            await self.nc.publish(self.subject, body, reply=self._inbox)
        except Exception as exc:  # disconnected: the watchdog asks again
            log.debug("pull request not sent: %s", exc)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if loop.time() - self._last_seen > 2.5 * self.heartbeat_s and self.nc.is_connected:
                self.credits = 0  # our requests are gone: ask anew
                self._last_seen = loop.time()
                self._ask()
