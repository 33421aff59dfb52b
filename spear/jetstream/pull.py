"""A callback-driven JetStream pull consumer that keeps up to `capacity` messages in hand.

It issues its own pull requests to a private inbox instead of looping on `fetch()`, which waits
for the end of each pull request after the first message (ARCHITECTURE.md): a message is handed
over the moment it arrives. Credits count the messages asked for and not yet delivered; expired
requests give theirs back (status 408 with `Nats-Pending-Messages`), and a watchdog re-asks when
no heartbeat arrives (a lost request, a reconnect, a restarted server).

A consumer given a `stall_s` says whether what it reads now may have been held up past it
(`stalled()`): after a silence of the server while a request was out (a connection that stops),
and while round trips to the consumer take longer (a path that runs late without going quiet, its
heartbeats and deliveries each seconds late). The round trip is timed every heartbeat with a
request the consumer's leader answers (its info): the path a delivery takes, over a cluster's
route too, so a delivery is late by at most a round trip.

Messages are handed over as `Delivery`s: bytes from the protocol parser (`rawsub.py`), with no
nats-py `Msg` made, no header block parsed unless asked for, no queue and task hop per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError, NotJSMessageError

from spear.aio import quietly
from spear.jetstream import hpub, rawsub
from spear.jetstream.connection import on_reconnect
from spear.jetstream.headers import parse_header_lines

log = logging.getLogger(__name__)

NO_RESPONDERS_RETRY_S = 0.1


class Delivery:
    """A delivered message as the parser read it: what a handler uses of nats-py's `Msg` (subject,
    reply, data, headers; ack, nak, term, in_progress, which raise as nats-py's do), the headers
    parsed only when read."""

    __slots__ = ("_block", "_headers", "acked", "data", "nc", "reply", "subject")

    def __init__(self, nc: Client, subject: str, reply: str, data: bytes, block: bytes):
        self.nc = nc
        self.subject = subject
        self.reply = reply
        self.data = data
        self._block = block
        self._headers: dict[str, str] | None = None
        self.acked = False  # acknowledged, handed back or terminated: nothing more may be said

    def header(self, name: str) -> str | None:
        """One header's value, as `headers` gives it; a name the block holds once, as a line of
        its own, is read without parsing the rest (~5 µs less: a worker's quick attempt reads the
        invocation's `traceparent` only)."""
        if self._headers is None:
            key = name.encode()
            if self._block.count(key) == 1:
                start = self._block.find(b"\r\n" + key + b":")
                if start >= 0:
                    start += len(key) + 3
                    end = self._block.find(b"\r\n", start)
                    return self._block[start : end if end >= 0 else None].strip().decode("utf-8", "replace")
        return (self.headers or {}).get(name)

    def carries(self, name: bytes) -> bool:
        """Whether the header block holds `name` anywhere (a header by that name, or a value
        containing it): cheap, without parsing; for a test whose false positives are harmless."""
        return name in self._block

    @property
    def headers(self) -> dict[str, str] | None:
        """The message's headers, as nats-py gives them (None if it has none)."""
        if self._headers is None and self._block:
            self._headers = parse_header_lines(self._block.partition(b"\r\n")[2])
        return self._headers or None

    async def ack(self) -> None:
        """Done with the message, as `Msg.ack`."""
        await self.nc.publish(self.reply, self.settle(b"+ACK"))

    async def nak(self, delay: float | None = None) -> None:
        """Hand the message back for redelivery (after `delay` seconds), as `Msg.nak` does."""
        await self.nc.publish(self.reply, self.settle(nak_payload(delay)))

    async def term(self) -> None:
        """Never deliver the message again, as `Msg.term`."""
        await self.nc.publish(self.reply, self.settle(b"+TERM"))

    async def in_progress(self) -> None:
        """Still being worked on: its ack timer starts again, as `Msg.in_progress`."""
        if self.acked:
            raise MsgAlreadyAckdError(self)
        await self.nc.publish(self.reply, b"+WPI")

    def adopt(self, newer: Delivery) -> None:
        """Answer from now on as `newer`: the same message delivered again while this delivery was
        still being worked on (its progress did not reach the server within the ack wait), so
        that in-progress acks and the final ack reach the delivery the server now holds."""
        self.reply = newer.reply

    def settle(self, payload: bytes) -> bytes:
        """`payload` (an ack, nak or term), once: MsgAlreadyAckdError if one was said before."""
        if self.acked:
            raise MsgAlreadyAckdError(self)
        self.acked = True
        return payload


def nak_payload(delay: float | None) -> bytes:
    """What a nak says: hand the message back now, or after `delay` seconds."""
    return b"-NAK" if not delay else b'-NAK {"delay": %d}' % int(delay * 10**9)


def status_headers(block: bytes) -> dict[str, str]:
    """A status message's header block (`NATS/1.0 408 Request Timeout`, then header lines) as
    nats-py parses it: "Status", "Description" and the headers."""
    first, _, rest = block.partition(b"\r\n")
    code, _, description = first[len(b"NATS/1.0 ") :].decode("utf-8", "replace").strip().partition(" ")
    headers = {"Status": code}
    if description:
        headers["Description"] = description
    headers.update(parse_header_lines(rest))
    return headers


class AckInfo(NamedTuple):
    """What a worker reads of a delivered message's metadata. (Not the time in the ack subject:
    that is when the message was stored, the same in every delivery of it, not when this
    delivery was handed out: review23.)"""

    stream_seq: int
    num_delivered: int


def ack_info(msg: Msg | Delivery) -> AckInfo:
    """The stream sequence and delivery count of a JetStream message, as nats-py's `msg.metadata`
    gives them, read from its ack subject without the rest (nats-py also builds a datetime and two
    dataclasses: ~4 µs a delivery here). NotJSMessageError, as nats-py raises, for a reply that is
    no ack subject."""
    info = _from_ack_subject(msg.reply or "")
    if info is None:
        raise NotJSMessageError
    return info


def stream_sequence(msg: Msg | Delivery) -> int:
    """The stream sequence of a JetStream message, read from its ack subject (ValueError if its
    reply is none)."""
    info = _from_ack_subject(msg.reply or "")
    if info is None:
        raise ValueError(f"not a JetStream ack subject: {(msg.reply or '')[:200]!r}")
    return info.stream_seq


def _from_ack_subject(reply: str) -> AckInfo | None:
    """`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`, or the form with domain and account
    hash (two tokens more); None for any other subject."""
    tokens = reply.split(".")
    if tokens[0] == "$JS" and len(tokens) > 1 and tokens[1] == "ACK":
        if len(tokens) == 9:
            return AckInfo(int(tokens[5]), int(tokens[4]))
        if len(tokens) >= 11:
            return AckInfo(int(tokens[7]), int(tokens[6]))
    return None


STALL_SETTLE_S = 1.0  # how long after a stall what is read counts as read in its aftermath
MAX_PROBES = 64  # round-trip probes on their way at once (one a heartbeat; older ones were lost)


class PullConsumer:
    """Hands each message of a durable pull consumer to `on_message` as it arrives; the handler
    calls `done()` when finished with it."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        on_delivery: Callable[[Delivery], None] | None,
        capacity: int,
        expires_s: float = 30.0,
        # A request held by a consumer leader that dies gets no answer at all: the watchdog notices
        # the missing heartbeats (2.5 of them) and asks again, so this bounds a stall after a node loss.
        heartbeat_s: float = 1.0,
        # Silence from the server this long while a pull request is out (no heartbeat, no delivery)
        # is a stall of the connection: what is read in its aftermath is `stalled()`.
        stall_s: float = math.inf,
    ):
        """`on_delivery` (or one set before `start`) is called from the read loop: it may not block."""
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._info_subject = f"$JS.API.CONSUMER.INFO.{stream}.{consumer}"  # (the round-trip probe)
        self.on_delivery = on_delivery
        # Whether a delivery beyond capacity is handed back (nak) or left to its ack wait
        self.may_hand_back: Callable[[Delivery], bool] = lambda delivery: True
        self.capacity = capacity
        self.expires_ns = int(expires_s * 1e9)
        self.heartbeat_s = heartbeat_s
        self.in_hand = 0  # delivered, not yet done
        self.credits = 0  # asked for, not yet delivered
        self._inbox = nc.new_inbox()
        self._sub: rawsub.RawSubscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_seen = 0.0
        self.stall_s = stall_s
        self._heard = time.monotonic()  # last message from the server while a request was out
        self._stalled_at = -math.inf  # when a silence over `stall_s` was last noticed
        # The watchdog gave up on requests it heard nothing of: they may be out still, held up in a
        # stall (`credits` no longer counts them), until the server is heard again
        self._unheard = False
        # Round-trip probes on their way (when each was sent, in ns, oldest first: the path keeps
        # their order, so one coming back ends those before it, lost if not back), and until when
        # a probe that came back slow says the path runs late
        self._probes: deque[int] = deque(maxlen=MAX_PROBES)
        self._probe_inbox = nc.new_inbox()
        self._probe_sub: rawsub.RawSubscription | None = None
        self._late_until = -math.inf
        # A probe out this long makes what is read suspect: a delivery that left the server just
        # after a probe is covered by the next one, sent up to a heartbeat later (review26: a lag
        # growing past `stall_s` between two probes read a delivery that late as fresh)
        self._late_s = max(0.0, stall_s - heartbeat_s)
        self._stopped = False
        self._sending: set[asyncio.Task[None]] = set()  # pull requests being published

    async def start(self) -> None:
        """Subscribe to the private inbox and send the first pull request."""
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        self._sub = await rawsub.subscribe_raw(self.nc, self._inbox, self._receive_raw)
        if math.isfinite(self.stall_s):
            self._probe_sub = await rawsub.subscribe_raw(self.nc, f"{self._probe_inbox}.*", self._probe_back)
        self._watchdog = loop.create_task(self._watch())
        on_reconnect(self.nc, self._renew)
        self._ask()

    def _renew(self) -> None:
        """After a reconnect the server may not know our pull requests any more: ask anew."""
        self.credits = 0
        self._unheard = False  # (a new connection: what the old one held is gone with it)
        self._probes.clear()
        self._late_until = -math.inf
        self._ask()

    async def stop(self) -> None:
        """Stop asking for more. Messages already on their way (up to a round trip) are handed
        straight back (nak), so another consumer gets them now rather than after the ack wait;
        messages in hand are left to their handlers."""
        self._stopped = True
        if self._watchdog:
            self._watchdog.cancel()
        for sub in (self._sub, self._probe_sub):
            if sub is None:
                continue
            try:
                await self.nc.flush()
                await sub.unsubscribe()
            except Exception:  # the connection may be closing already
                pass

    def resize(self, capacity: int) -> None:
        """Hold at most `capacity` messages from now on (those asked for already still come)."""
        self.capacity = max(0, capacity)
        self._ask()

    def done(self, count: int = 1) -> None:
        """A handler finished with `count` messages: their slots can be refilled."""
        self.in_hand -= count
        self._ask()

    def _receive_raw(self, subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        # Called inside the connection's read loop (`rawsub.py`): nothing here may block.
        self._last_seen = asyncio.get_running_loop().time()
        now = time.monotonic()
        if (self.credits > 0 or self._unheard) and now - self._heard > self.stall_s:  # heartbeats were due
            self._stalled_at = now
        self._heard = now
        self._unheard = False
        if not data and block.startswith(b"NATS/1.0 "):  # a status line, where a message has none
            self._on_status(status_headers(block))
            return
        if not reply.startswith(b"$JS.ACK."):  # not a delivery: a message published to the inbox
            log.warning("pull %s: ignored a message to its inbox that JetStream did not deliver", self.subject)
            return
        # A stored subject need not be UTF-8 (the server takes any bytes): the event is then unreadable.
        delivery = Delivery(self.nc, subject.decode(errors="replace"), reply.decode(), data, block)
        if not self._take():
            if self.may_hand_back(delivery):
                self._spawn(quietly(delivery.nak()))
            return
        if self.on_delivery is not None:
            self.on_delivery(delivery)
        if self.credits == 0:  # the last asked for came while slots were freed: ask for those now
            self._ask()  # (probe30: slots freed while credits were out stayed empty until the watchdog, ~3 s)

    def stalled(self) -> bool:
        """Whether what is read now may have been held up over `stall_s`: it comes right after a
        silence of the connection that long while a pull request was out (its heartbeats held up
        with its deliveries: a stall), or while a round trip to the consumer takes about that long."""
        now = time.monotonic()
        return (
            now - self._stalled_at < STALL_SETTLE_S
            or now < self._late_until
            or (bool(self._probes) and now - self._probes[0] / 1e9 > self._late_s)
        )

    def _probe_back(self, subject: bytes, reply: bytes, data: bytes, block: bytes) -> None:
        """A round-trip probe was answered (in the read loop): how late the path runs. Its reply
        subject's last token says when it was sent."""
        try:
            sent_ns = int(subject.rsplit(b".", 1)[-1])
        except ValueError:  # (not one of ours)
            return
        while self._probes and self._probes[0] <= sent_ns:  # (those before it were lost)
            self._probes.popleft()
        now = time.monotonic()
        took = now - sent_ns / 1e9
        # Slow: what is read until the next probe comes back may be as late (a probe on its way
        # covers that once it is out longer). Quick: what follows it left the server after it.
        self._late_until = now + took if took > self._late_s else -math.inf

    def _time_round_trip(self) -> None:
        """Send a round-trip probe (every heartbeat, by the watchdog): queued at once, as pull
        requests are, so a full outgoing buffer never holds up the watchdog."""
        if self._probe_sub is None or not self.nc.is_connected:
            return
        sent_ns = time.monotonic_ns()
        reply = f"{self._probe_inbox}.{sent_ns}"
        self._probes.append(sent_ns)  # (before it can come back)
        try:
            if not hpub.publish_now(self.nc, self._info_subject, b"", reply):
                self._spawn(self._publish_to(self._info_subject, b"", reply))
        except Exception as exc:  # disconnected: the next heartbeat's probe
            log.debug("pull %s: round-trip probe not sent: %s", self.subject, exc)
            with contextlib.suppress(ValueError):
                self._probes.remove(sent_ns)

    def _take(self) -> bool:
        """Count a message delivered; False once stopped, or beyond a capacity lowered since it was
        asked for (it is to be handed back, for a consumer with room to take)."""
        self.credits = max(0, self.credits - 1)
        if self._stopped or self.in_hand >= self.capacity:
            return False
        self.in_hand += 1
        return True

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
        if self.credits == 0 and not self._unheard:  # nothing was out: silence until now was no stall
            self._heard = time.monotonic()
        self.credits += want
        body = msgspec.json.encode(
            {"batch": want, "expires": self.expires_ns, "idle_heartbeat": int(self.heartbeat_s * 1e9)}
        )
        try:  # queued at once, no task (a pull request per few deliveries: a task each cost the worker ~4%)
            if hpub.publish_now(self.nc, self.subject, body, self._inbox):
                return
        except Exception as exc:  # disconnected: the watchdog asks again
            log.debug("pull request not sent: %s", exc)
            return
        self._spawn(self._publish_to(self.subject, body, self._inbox))

    def _spawn(self, sending: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(sending)
        self._sending.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._sending.discard)

    async def _publish_to(self, subject: str, body: bytes, reply: str) -> None:
        try:
            await self.nc.publish(subject, body, reply=reply)
        except Exception as exc:  # disconnected: the watchdog asks (and probes) again
            log.debug("pull request not sent: %s", exc)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._time_round_trip()
            # (at least 2.5 s, as with the 1 s heartbeats before: a loaded machine's late
            # heartbeats of shorter ones are no lost request, and a request asked anew beside a
            # live one brings deliveries beyond capacity, handed back)
            if loop.time() - self._last_seen > max(2.5 * self.heartbeat_s, 2.5) and self.nc.is_connected:
                # (or held up in a stall, if any was out: its silence goes on counting. Not when
                # none was: a worker whose capacity was full is silent without any stall)
                self._unheard = self._unheard or self.credits > 0
                self.credits = 0  # our requests are gone: ask anew
                self._last_seen = loop.time()
                heard = self._heard  # (a request sent into a stall does not end the silence)
                self._ask()
                self._heard = heard
