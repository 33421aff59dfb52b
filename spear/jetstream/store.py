"""The event store on JetStream: the only writer of events, and the reader of one execution's history.

Appends go to `P.append.<task>.<id>.<kind>`; the stream stores them as `P.exec.…` and re-publishes
each one only once it is stored, so live subscribers never see a duplicate or rejected append.
Two guards make appends safe to repeat and race: a `Nats-Msg-Id` (a re-append inside the dedupe
window is acknowledged as a duplicate and stored once) and an expected last sequence over all of
the execution's subjects (an append based on a stale view of the execution is rejected). The
server checks that sequence before the id (nats-server 2.15): a fenced append sent again after it
was stored is refused, not acknowledged as a duplicate; whose is the last event, the caller reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from opentelemetry.trace import INVALID_SPAN, Span

from spear.core.events import BadEvent, Event, decode_event, encode_event
from spear.core.eventstore import (
    AppendConflict,
    Appended,
    Stored,
    StoreError,
    StoreFull,
    StoreNotReached,
    StoreUnavailable,
)
from spear.core.names import Names
from spear.jetstream import directget, hpub, leaderget, rawrequests
from spear.jetstream.directget import Found
from spear.jetstream.errors import UNREACHABLE, append_refusal, permission_denied
from spear.telemetry import tracing

log = logging.getLogger(__name__)


__all__ = ["AppendConflict", "Appended", "JetStreamStore", "StoreError", "StoreUnavailable", "Stored"]


def _readable(found: Found) -> Stored | None:
    """A stored message as a stored event, or None (logged) if it is not a trustworthy one."""
    try:
        return Stored(decode_event(found.data, found.subject), found.seq)
    except BadEvent as exc:
        log.warning("store: stored message %s left out: %s", found.seq, exc)
        return None


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)

OnStored = Callable[[Appended | Exception], None]  # what an append became: stored, or why not

# An append nothing takes (a 503 "no responders": the stream's leader is lost and a new one not
# elected yet, 5-7 s in probe58's 3-node cluster, or JetStream is down) was not stored, so it is
# sent again after a pause growing from the first to the last, within the append's timeout: as
# long as an append whose acknowledgement is lost takes to fail, so no caller waits longer.
RESEND_FIRST_PAUSE_S = 0.05
RESEND_LAST_PAUSE_S = 0.5
RESEND_ACK_S = 0.1


class _Resends:
    """When an append that nothing took is sent again, for at most `within_s` from the first send."""

    __slots__ = ("began", "pause_s", "until")

    def __init__(self, within_s: float):
        self.began = time.monotonic()
        self.until = self.began + within_s
        self.pause_s = RESEND_FIRST_PAUSE_S

    def next_pause(self) -> float | None:
        """The pause before sending again (the last one shortened so that the send still has
        RESEND_ACK_S for its acknowledgement), or None: the time is up."""
        pause_s = min(self.pause_s, self.until - RESEND_ACK_S - time.monotonic())
        if pause_s < 0.01:
            return None
        self.pause_s = min(self.pause_s * 2, RESEND_LAST_PAUSE_S)
        return pause_s

    def left_s(self) -> float:
        """How long the next send may wait for its acknowledgement."""
        return max(0.01, self.until - time.monotonic())

    def not_reached(self, last: str = "") -> StoreNotReached:
        """The error to raise: nothing took the append, and `last` what became of its last send."""
        waited_s = time.monotonic() - self.began
        return StoreNotReached(
            f"JetStream did not store the event: nothing took it for {waited_s:.1f} s (no responders: "
            f"the stream has no leader, or JetStream is down){'; ' + last if last else ''}"
        )


def _nothing_took(reply: rawrequests.RawReply | Exception) -> bool:
    return not isinstance(reply, Exception) and rawrequests.no_responders(reply)


class JetStreamStore:
    """The EventStore (`spear.core.eventstore`) on the executions stream."""

    def __init__(self, nc: Client, names: Names, timeout: float = 5.0):
        self.nc = nc
        self.names = names
        self.timeout = timeout
        self._replicas: int | None = None  # the stream's, read once: replicated streams read from the leader
        self.full_at: float | None = None  # (monotonic) when JetStream last refused an append for lack of room

    async def append(
        self,
        event: Event,
        *,
        expect_last_seq: int | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        expect_last_msg_id: str | None = None,
    ) -> Appended:
        """Store one event. `expect_last_seq=0` means: the execution has no event yet;
        `expect_last_msg_id`: the stream's newest message must be the one with that id.

        Each append is a PRODUCER span under the current context (or under the `traceparent` in
        `headers`, the invocation's, when the caller works for another trace) and the stored
        event carries that span's context in its headers."""
        with self._span(event, headers) as span:
            hdrs = self._headers(event, expect_last_seq, headers)
            if msg_id:
                hdrs["Nats-Msg-Id"] = msg_id
            if expect_last_msg_id:
                hdrs["Nats-Expected-Last-Msg-Id"] = expect_last_msg_id
            # (a lone event is sent again where nothing took it; a batch's or a chain's last is
            # fenced on messages before it that nothing took either, so those are not)
            return _recorded(span, await self._commit(event, hdrs, resend=True))

    async def append_batch(
        self, events: list[Event], *, expect_last_seq: int, headers: dict[str, str] | None = None
    ) -> Appended:
        """Store several events of one execution atomically, in order (a JetStream atomic batch):
        all or none, fenced on `expect_last_seq` like one append. Returns the last one's sequence.
        The batch's first messages are published without waiting; only the commit is awaited.
        One PRODUCER span covers the batch."""
        if len(events) == 1:
            return await self.append(events[0], expect_last_seq=expect_last_seq, headers=headers)
        with self._span(events[-1], headers) as span:
            if span.is_recording():
                span.set_attribute("messaging.batch.message_count", len(events))
            batch_id = uuid.uuid4().hex
            for index, event in enumerate(events[:-1], start=1):
                hdrs = self._headers(event, expect_last_seq if index == 1 else None, headers)
                hdrs.update({"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(index)})
                subject = self.names.append(event.task_id, event.execution_id, event.kind)
                await self.nc.publish(subject, encode_event(event), headers=hdrs)
            hdrs = self._headers(events[-1], None, headers)
            hdrs.update({"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(len(events)), "Nats-Batch-Commit": "1"})
            return _recorded(span, await self._commit(events[-1], hdrs))

    async def append_chain(
        self,
        events: list[Event],
        *,
        expect_last_seq: int,
        msg_ids: list[str],
        headers: dict[str, str] | None = None,
    ) -> Appended:
        """Store events of one execution in order, published back to back: the first fenced on
        `expect_last_seq`, each next one on its predecessor being the stream's newest message
        (`Nats-Expected-Last-Msg-Id`: the server refuses it if any message came between, or if
        the predecessor was refused). Only the last is acknowledged, so a chain costs one round
        trip and no ack per message before it; its Appended, or AppendConflict (then any prefix
        may be stored). An Appended with `duplicate` names a message stored before under the last
        one's id, not this chain's: what is stored is for the caller to read (JetStream checks
        the id before the fences). The events are of one trace: the `traceparent`'s in `headers`,
        else the current one, else (tracing off: no span is made to be their root) a new one."""
        if not events or any(not msg_id for msg_id in msg_ids[:-1]):
            raise ValueError("a chain needs events, and a message id for each but the last")
        if not tracing.may_record():  # no span to be the events' common parent: one trace all the same
            headers = tracing.rooted(headers)
        if await self._replicated():
            return await self._append_one_by_one(events, expect_last_seq, msg_ids, headers)
        for index, event in enumerate(events):
            with self._span(event, headers) as span:  # one PRODUCER span per event, as appends have
                hdrs = self._chained(index, event, expect_last_seq, msg_ids, headers)
                if index == len(events) - 1:
                    return _recorded(span, await self._commit(event, hdrs))
                subject = self.names.append(event.task_id, event.execution_id, event.kind)
                await self.nc.publish(subject, encode_event(event), headers=hdrs)
        raise AssertionError("unreachable: the last event returns")

    def _chained(
        self, index: int, event: Event, expect_last_seq: int, msg_ids: list[str], headers: dict[str, str] | None
    ) -> dict[str, str]:
        """The headers of a chain's `index`th event: the first fenced on `expect_last_seq`, each
        next one on its predecessor's message id being the stream's newest."""
        hdrs = self._headers(event, expect_last_seq if index == 0 else None, headers)
        if msg_ids[index]:
            hdrs["Nats-Msg-Id"] = msg_ids[index]
        if index:
            hdrs["Nats-Expected-Last-Msg-Id"] = msg_ids[index - 1]
        return hdrs

    async def prepare_now(self) -> None:
        """Make `append_now` and `append_chain_now` possible from the start: the stream's replicas
        read, the connection's reply subscription made."""
        await self._replicated()
        await rawrequests.prepare(self.nc)

    def append_chain_now(
        self,
        events: list[Event],
        *,
        expect_last_seq: int,
        msg_ids: list[str],
        headers: dict[str, str] | None,
        on_stored: OnStored,
    ) -> bool:
        """`append_chain` without awaiting, for a caller on the read loop with tracing off (a
        worker's quick first attempt): `on_stored` gets the last event's Appended, or the error
        `append_chain` would raise, once JetStream answers. False (nothing sent): tracing is on,
        the stream is replicated or not known yet (a chain is then stored one by one), or the
        connection cannot take it this way now; use `append_chain`."""
        if not events or any(not msg_id for msg_id in msg_ids[:-1]):
            raise ValueError("a chain needs events, and a message id for each but the last")
        if tracing.may_record() or self._replicas != 1 or not rawrequests.ready(self.nc) or hpub.crowded(self.nc):
            return False
        headers = tracing.rooted(headers)
        commands = [
            (
                self.names.append(e.task_id, e.execution_id, e.kind),
                encode_event(e),
                self._chained(i, e, expect_last_seq, msg_ids, headers),
            )
            for i, e in enumerate(events)
        ]
        try:  # (publish_now declines all or none: only where nats-py's publishing is not the one hpub mirrors)
            for subject, data, hdrs in commands[:-1]:
                hpub.publish_now(self.nc, subject, data, "", hdrs)
            subject, data, hdrs = commands[-1]
            return rawrequests.request_now(self.nc, subject, data, self.timeout, hdrs, self._answer_to(on_stored))
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"JetStream did not store the event: {type(exc).__name__}") from None

    def _answer_to(self, on_stored: OnStored) -> rawrequests.OnReply:
        """A raw reply's callback that gives `on_stored` what the acknowledgement says."""
        return lambda reply: self._give(on_stored, reply, None)

    def _give(self, on_stored: OnStored, reply: rawrequests.RawReply | Exception, resends: _Resends | None) -> None:
        """Give `on_stored` what the acknowledgement `reply` says."""
        try:
            appended: Appended | Exception = self._acknowledged(reply, resends)
        except Exception as exc:
            appended = exc
        on_stored(appended)

    async def _append_one_by_one(
        self, events: list[Event], expect_last_seq: int, msg_ids: list[str], headers: dict[str, str] | None
    ) -> Appended:
        """A chain on a replicated stream: each event acknowledged, the next fenced on its sequence.
        Measured on a 3-node cluster, a chain's unacknowledged messages fenced on the last message
        id stalled the stream under concurrent appends from several processes (appends timed out,
        "JetStream system temporarily unavailable"); one round trip per event does not."""
        appended = Appended(expect_last_seq, False)
        for index, (event, msg_id) in enumerate(zip(events, msg_ids, strict=True)):
            appended = await self.append(event, expect_last_seq=appended.seq, msg_id=msg_id or None, headers=headers)
            if appended.duplicate and index < len(events) - 1:  # stored before: whose, the caller reads
                raise AppendConflict(f"{event.kind} was stored before", None)
        return appended

    def _span(self, event: Event, headers: dict[str, str] | None) -> AbstractContextManager[Span]:
        """The append's PRODUCER span, made current; none while tracing is off (nothing would
        record it: `_headers` gives the event the context of a span id drawn for it instead)."""
        if not tracing.may_record():
            return _NO_SPAN
        subject = self.names.append(event.task_id, event.execution_id, event.kind)
        template = self.names.append(event.task_id, "{execution_id}", event.kind)
        attributes = {"spear.execution_id": event.execution_id, "spear.attempt": event.attempt}
        return _fenced(tracing.producer(subject, template, attributes, headers))

    def _headers(self, event: Event, expect_last_seq: int | None, headers: dict[str, str] | None) -> dict[str, str]:
        """The caller's headers, the fencing ones, and the trace context of the append's span."""
        hdrs = {"Nats-Expected-Stream": self.names.stream}
        if headers:
            hdrs.update(headers)
        if tracing.may_record():
            tracing.inject(hdrs)
        else:
            tracing.inject_unsampled(hdrs, headers)
        if expect_last_seq is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(expect_last_seq)
            hdrs["Nats-Expected-Last-Subject-Sequence-Subject"] = self.names.execution_events(event.execution_id)
        return hdrs

    def append_now(self, event: Event, msg_id: str, on_stored: OnStored) -> bool:
        """`append(event, msg_id=msg_id)` without awaiting, for a caller on the read loop with
        tracing off (an ASYNC call accepted without a task): `on_stored` gets the Appended, or
        the error `append` would raise, once JetStream answers. False (nothing sent): tracing is
        on, or the connection cannot take it this way yet; use `append`."""
        if tracing.may_record():  # the append's span is made by `append`
            return False
        hdrs = self._headers(event, None, None)
        hdrs["Nats-Msg-Id"] = msg_id
        subject = self.names.append(event.task_id, event.execution_id, event.kind)
        data = encode_event(event)
        resends = _Resends(self.timeout)

        def answered(reply: rawrequests.RawReply | Exception) -> None:
            pause_s = resends.next_pause() if _nothing_took(reply) else None
            if pause_s is None:
                self._give(on_stored, reply, resends)
            else:  # sent again from the loop, as `append` does (the same id: stored once)
                asyncio.get_running_loop().call_later(pause_s, self._send_again, subject, data, hdrs, resends, answered)

        try:
            return rawrequests.request_now(self.nc, subject, data, self.timeout, hdrs, answered)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"JetStream did not store the event: {type(exc).__name__}") from None

    def _send_again(
        self, subject: str, data: bytes, hdrs: dict[str, str], resends: _Resends, answered: rawrequests.OnReply
    ) -> None:
        """`append_now`'s append sent again; `answered` gets what becomes of it, whatever that is
        (review62: a publish refused for a full buffer or a draining connection raised out of
        the timer, and the call was never answered)."""
        why = "the connection cannot take it this way now"
        try:
            sent = rawrequests.request_now(self.nc, subject, data, resends.left_s(), hdrs, answered)
        except Exception as exc:  # (nats-py checks before it writes: not sent)
            sent, why = False, type(exc).__name__
        if not sent:  # nothing took it, nor was it sent again: surely not stored
            answered(resends.not_reached(f"not sent again: {why}"))

    async def _commit(self, event: Event, hdrs: dict[str, str], *, resend: bool = False) -> Appended:
        """Send the event and read its acknowledgement; `resend`: again while nothing takes it."""
        subject = self.names.append(event.task_id, event.execution_id, event.kind)
        data = encode_event(event)
        resends = _Resends(self.timeout) if resend else None
        timeout = self.timeout
        while True:
            reply: rawrequests.RawReply | Exception
            try:
                # the acknowledgement taken raw, resolved from the read loop: on the path of every
                # append (a SYNC call's chain, a worker's end), one Msg and one task hop less
                reply = await rawrequests.request(self.nc, subject, data, timeout, hdrs)
            except UNREACHABLE as exc:
                reply = exc
            pause_s = resends.next_pause() if resends is not None and _nothing_took(reply) else None
            if pause_s is None or resends is None:
                return self._acknowledged(reply, resends)
            await asyncio.sleep(pause_s)
            timeout = resends.left_s()

    def _acknowledged(self, reply: rawrequests.RawReply | Exception, resends: _Resends | None = None) -> Appended:
        """What JetStream's answer to an append says: the Appended, or the error to raise."""
        if isinstance(reply, Exception):
            if isinstance(reply, UNREACHABLE):
                raise StoreUnavailable(f"JetStream did not store the event: {type(reply).__name__}")
            raise reply
        if rawrequests.no_responders(reply):
            if resends is None:  # (a chain's last: the messages before it may be stored)
                raise StoreUnavailable("JetStream did not store the event: NoRespondersError")
            raise resends.not_reached()
        ack = _ack_decoder.decode(reply.data)
        if ack.error:
            refusal = append_refusal(ack.error)
            if isinstance(refusal, StoreFull):  # said by health for a while (probe20: it said healthy)
                self.full_at = time.monotonic()
            raise refusal
        return Appended(ack.seq, ack.duplicate)

    async def invocation_traceparent(self, execution_id: str) -> str:
        """The trace context the execution's `requested` event was stored with ("" if none)."""
        found = await self._last(self.names.event("*", execution_id, "requested"))
        return "" if found is None else found.headers.get(tracing.TRACEPARENT, "")

    async def last(self, execution_id: str) -> Stored | None:
        """The newest readable stored event of an execution, with the sequence of the newest
        stored message (one read). Should the newest be unreadable junk, the history is
        read for the event, and the sequence still names the junk, so that an append expecting
        it goes after it: what no reader can use is ignored, and never blocks the execution."""
        found = await self._last(self.names.execution_events(execution_id))
        if found is None:
            return None
        stored = _readable(found)
        if stored is not None:
            return stored
        history = await self.history(execution_id)
        return Stored(history[-1].event, found.seq) if history else None

    async def last_of_kind(self, execution_id: str, kind: str) -> Stored | None:
        """The execution's newest readable event of `kind` (one read, however long its history)."""
        found = await self._last(self.names.event("*", execution_id, kind))
        return _readable(found) if found is not None else None

    async def history(self, execution_id: str, after_seq: int = 0) -> list[Stored]:
        """Every readable stored event of an execution after `after_seq`, in stream order (batched
        direct gets). Events that are unreadable, or whose body disagrees with their subject, are
        left out: the subject is the authority, and no reader acts on what it cannot trust."""
        subject_filter = self.names.execution_events(execution_id)
        found = [
            msg async for msg in directget.read_all(self.nc, self.names.stream, subject_filter, after_seq, self.timeout)
        ]
        return await self._completed(subject_filter, found, after_seq)

    async def history_page(
        self, execution_id: str, after_seq: int = 0, max_bytes: int = directget.BATCH_BYTES
    ) -> tuple[list[Stored], bool]:
        """`history` one batched read at a time: the events after `after_seq` one read returns (up
        to about `max_bytes` of them, at least one), and whether more follow. A reader that pages
        holds one page, not the rest of a long stream (probe32: each late SSE client of a stream
        of 160 MB held all of it, and each page of GetExecutionEvents read all of it again)."""
        subject_filter = self.names.execution_events(execution_id)
        while True:
            batch = await directget.read_batch(
                self.nc, self.names.stream, subject_filter, after_seq + 1, self.timeout, max_bytes=max_bytes
            )
            if not batch.more:
                return await self._completed(subject_filter, list(batch.found), after_seq), False
            page = [stored for message in batch.found if (stored := _readable(message)) is not None]
            if page or not batch.found:
                return page, True
            after_seq = batch.found[-1].seq  # (unreadable only: on to the next, or a reader is stuck)

    async def _completed(self, subject_filter: str, found: list[Found], after_seq: int) -> list[Stored]:
        """The readable events of a read that found no more, with what a lagging replica had not
        yet: a read-your-writes history."""
        if await self._replicated():
            # The replica that answered may lag (it holds a prefix of the stream): the leader's
            # newest event says whether anything is missing at the end, and the leader fills it in.
            newest = await self._last(subject_filter)
            seq = found[-1].seq if found else after_seq
            while newest is not None and seq < newest.seq:
                following = await leaderget.next_by_subject(
                    self.nc, self.names.stream, subject_filter, seq + 1, self.timeout
                )
                if following is None:
                    break
                found.append(following)
                seq = following.seq
        return [stored for message in found if (stored := _readable(message)) is not None]

    async def _last(self, subject_filter: str) -> Found | None:
        """The newest stored message on `subject_filter`: a direct get, or the leader's answer
        where the stream is replicated (a follower may not hold what was just stored)."""
        if await self._replicated():
            return await leaderget.last_by_subject(self.nc, self.names.stream, subject_filter, self.timeout)
        return await directget.newest(self.nc, self.names.stream, subject_filter, self.timeout)

    async def _replicated(self) -> bool:
        """Whether the executions stream has replicas besides its leader (read once)."""
        if self._replicas is None:
            try:
                info = await self.nc.jetstream(timeout=self.timeout).stream_info(self.names.stream)
            except NotFoundError:
                return False  # not created yet: nothing to read either
            except UNREACHABLE as exc:
                subject = f"$JS.API.STREAM.INFO.{self.names.stream}"
                if permission_denied(self.nc, subject):
                    return False  # a reader without it reads directly (and is told if that is refused)
                raise StoreUnavailable(f"JetStream did not answer: {type(exc).__name__}") from None
            self._replicas = info.config.num_replicas or 1
        return self._replicas > 1

    async def stored(self, subject_filter: str, after_seq: int, limit: int) -> list[Stored]:
        """Up to `limit` stored events on `subject_filter` after `after_seq`, in stream order."""
        found: list[Stored] = []
        async for msg in directget.read_all(self.nc, self.names.stream, subject_filter, after_seq, self.timeout):
            stored = _readable(msg)
            if stored is not None:
                found.append(stored)
            if len(found) >= limit:
                break
        return found

    async def last_seq(self) -> int:
        """The stream's last sequence: where "from now on" starts."""
        try:
            info = await self.nc.jetstream(timeout=self.timeout).stream_info(self.names.stream)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"JetStream did not answer: {type(exc).__name__}") from None
        return int(info.state.last_seq)


_NO_SPAN = nullcontext(INVALID_SPAN)


@contextmanager
def _fenced(producer: AbstractContextManager[Span]) -> Iterator[Span]:
    """An append's span, which an append its fence refused leaves unmarked: a lost race is how
    fencing works (a worker's end after a cancel, a cancel after the worker's own), not an
    error (probe54: every forced cancel left an ERROR span, and alerts on span status paged)."""
    refused: AppendConflict | None = None
    with producer as span:
        try:
            yield span
        except AppendConflict as conflict:
            if span.is_recording():
                span.set_attribute("spear.append.refused", str(conflict))
            refused = conflict
    if refused is not None:
        raise refused


def _recorded(span: Span, appended: Appended) -> Appended:
    if span.is_recording():
        span.set_attribute("messaging.nats.stream_sequence", appended.seq)
    return appended
