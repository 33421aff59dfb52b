"""The nats-py errors that mean "NATS is not reachable right now" (as opposed to a refusal)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from spear.core.eventstore import AppendConflict, StoreError, StoreFull, StoreUnavailable

# JetStream's refusals of a publish whose expected last (subject) sequence did not match: 10071
# "wrong last sequence: N" on a one-replica stream, 10164 "wrong last sequence" (no N) on a
# replicated one, where the leader may also refuse while earlier appends are still being
# replicated. Both mean a lost compare-and-set: read, decide again.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
WRONG_LAST_MSG_ID = 10070  # Nats-Expected-Last-Msg-Id: another message came between
# JetStream's "temporarily unavailable" (a cluster electing a leader, a node catching up): the
# request may work in a moment, as when nothing answered (UNAVAILABLE, never INTERNAL).
TEMPORARILY_UNAVAILABLE = 10008
# JetStream has no room to store it: its storage limit (`max_file_store`) is reached.
INSUFFICIENT_RESOURCES = 10023

# A request that met one of these may work later: nothing answered, in time or at all.
UNREACHABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
)


def jetstream_busy(exc: BaseException) -> bool:
    """A 503 from the JetStream API as nats-py raises it (`ServiceUnavailableError`: temporarily
    unavailable, a cluster electing, JetStream off), except "insufficient resources" (full), which
    waiting does not mend. Like UNREACHABLE, it may work later: UNAVAILABLE, never INTERNAL
    (probe58: health and admission said INTERNAL, HTTP 500, for 503/10008)."""
    return isinstance(exc, nats.js.errors.ServiceUnavailableError) and exc.err_code != INSUFFICIENT_RESOURCES


def permission_denied(nc: Client, subject: str) -> str | None:
    """What to say when a request on `subject` went unanswered because the server refused it:
    NATS drops a denied publish and says so only asynchronously (-ERR), so the request would
    otherwise look like a timeout. None when the last error is no such refusal."""
    error = str(nc.last_error or "")
    if "permissions violation" in error.lower() and subject.lower() in error.lower():
        return f"permission denied: this NATS user may not publish to {subject} ({error.removeprefix('nats: ')})"
    return None


def append_refusal(error: Mapping[str, Any]) -> StoreError:
    """The store's error for JetStream's refusal of an append (the `error` of its ack): a lost
    compare-and-set is an AppendConflict, with the actual last sequence when the server says it;
    anything else a StoreError."""
    description = str(error.get("description", error))
    code = error.get("err_code")
    if code in WRONG_LAST_SEQUENCE:
        return AppendConflict(description, _last_seq(description))
    if code == WRONG_LAST_MSG_ID:
        return AppendConflict(description)
    return api_refusal(error)


def api_refusal(error: Mapping[str, Any]) -> StoreError:
    """The store's error for another JetStream API error: StoreUnavailable for one that passes
    by itself (temporarily unavailable), else a StoreError (JetStream also says 503 for a full
    stream, which waiting does not mend)."""
    description = str(error.get("description", error))
    if error.get("err_code") == TEMPORARILY_UNAVAILABLE:
        return StoreUnavailable(description)
    if error.get("err_code") == INSUFFICIENT_RESOURCES:
        return StoreFull(description)
    return StoreError(description)


def _last_seq(description: str) -> int | None:
    """The actual last sequence from "wrong last sequence: N" (None without one, as on a
    replicated stream)."""
    _, colon, tail = description.rpartition(":")
    digits = tail.strip()
    return int(digits) if colon and digits.isdigit() else None
