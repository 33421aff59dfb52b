"""Reads answered by the stream's leader: read-your-writes on a replicated stream.

A direct get (`$JS.API.DIRECT.GET`) may be answered by any replica, and a follower can lag the
leader by a few milliseconds: right after an append was acknowledged, or right after its event
was re-published, a follower can still answer with the event before it. Measured on a 3-node
cluster: about 1 SYNC call in 20 saw its confirming read miss the terminal event just stored.
`$JS.API.STREAM.MSG.GET` is answered by the leader, which acknowledged every append it stored:
slower (a JSON reply, base64 inside), so spear uses it only where the stream is replicated.
"""

from __future__ import annotations

import base64

import msgspec
from nats.aio.client import Client

from spear.core.eventstore import StoreUnavailable
from spear.jetstream import requests
from spear.jetstream.directget import Found
from spear.jetstream.errors import UNREACHABLE, api_refusal, permission_denied

NOT_FOUND = 10037  # JetStream's "no message found"


class _Message(msgspec.Struct):
    subject: str
    seq: int
    data: str = ""
    hdrs: str = ""


class _Reply(msgspec.Struct):
    message: _Message | None = None
    error: dict[str, object] | None = None


_decoder = msgspec.json.Decoder(_Reply)


async def last_by_subject(nc: Client, stream: str, subject_filter: str, timeout: float) -> Found | None:
    """The newest stored message on `subject_filter` (wildcards allowed), or None."""
    return await _get(nc, stream, {"last_by_subj": subject_filter}, timeout)


async def next_by_subject(nc: Client, stream: str, subject_filter: str, seq: int, timeout: float) -> Found | None:
    """The first stored message on `subject_filter` at or after `seq`, or None."""
    return await _get(nc, stream, {"seq": seq, "next_by_subj": subject_filter}, timeout)


async def _get(nc: Client, stream: str, request: dict[str, object], timeout: float) -> Found | None:
    subject = f"$JS.API.STREAM.MSG.GET.{stream}"
    try:
        reply = await requests.request(nc, subject, msgspec.json.encode(request), timeout)
    except UNREACHABLE as exc:
        refused = permission_denied(nc, subject)
        raise StoreUnavailable(
            refused or f"JetStream did not answer a read of {stream}: {type(exc).__name__}"
        ) from None
    answer = _decoder.decode(reply.data)
    if answer.error is not None:
        if answer.error.get("err_code") == NOT_FOUND:
            return None
        raise api_refusal(answer.error)
    if answer.message is None:
        return None
    message = answer.message
    return Found(message.subject, message.seq, base64.b64decode(message.data), _headers(message.hdrs))


def _headers(encoded: str) -> dict[str, str]:
    """A NATS header block (`NATS/1.0` then `Name: value` lines), base64-encoded, as a dict."""
    headers: dict[str, str] = {}
    if not encoded:
        return headers
    for line in base64.b64decode(encoded).decode(errors="replace").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon and name:
            headers[name.strip()] = value.strip()
    return headers
