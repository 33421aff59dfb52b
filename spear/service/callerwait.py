"""What the caller of an invocation says in its request headers: how long it waits for a SYNC
reply (`Spear-Wait-Ms`), and that it made the execution id just now (`Spear-New-Execution-Id`).

A NATS requester that gives up leaves no trace the gateway could see, so a SYNC call abandoned by
its caller would hold its admission slot until the execution ends (or `max_wait_ms`). A caller
that says how long it waits lets the gateway end its own wait just before, reply
DEADLINE_EXCEEDED (the execution goes on, as an ASYNC one would) and free the slot. The adapters
read the header (NATS or HTTP, one helper) into a context variable the service's wait honours.

A client that makes the execution id itself (the SDK, the CLI: so that an error can name the
execution even when the reply is lost) says so with `Spear-New-Execution-Id: true`: the id names
no execution yet, so the gateway may run an inline function itself before anything is stored, as
it does for ids it makes (a chosen id without it may name an execution that exists, and the
function would run a second time). A client that says so of an id it used before is answered as
without the header (the same request joins, another is ALREADY_EXISTS): the gateway's run, if it
made one, is discarded once its chain is refused (`spear.service.inline`; probe57).

An adapter that knows who asks vouches for it: the HTTP API sets `caller_may_register` for an
invocation that would register its task (NEW_TASK, create_if_not_exists) once the caller's token
has the admin role (or tokens are off). NATS does not say who asks: there `[tasks]
nats_invoke_registers` decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar

from spear.core.enums import ApiError, ErrorCode

WAIT_HEADER = "Spear-Wait-Ms"
NEW_ID_HEADER = "Spear-New-Execution-Id"
MAX_WAIT_MS = 7 * 24 * 3600 * 1000
# The reply must reach the caller before its own timeout fires: end this much earlier.
REPLY_MARGIN_MS = 100

caller_wait_ms: ContextVar[int | None] = ContextVar("caller_wait_ms", default=None)
caller_made_new_id: ContextVar[bool] = ContextVar("caller_made_new_id", default=False)
caller_may_register: ContextVar[bool] = ContextVar("caller_may_register", default=False)


def read_caller_headers(headers: Mapping[str, str] | None) -> None:
    """Set this request's context variables from its headers (its own task only)."""
    caller_wait_ms.set(read_wait_header(headers))
    made = next((v for k, v in (headers or {}).items() if k.lower() == NEW_ID_HEADER.lower()), "")
    caller_made_new_id.set(made.strip().lower() == "true")


def read_wait_header(headers: Mapping[str, str] | None) -> int | None:
    """The caller's wait in ms from `Spear-Wait-Ms` (any case), None if absent; INVALID_ARGUMENT
    if it is not a whole number of milliseconds from 1 to a week."""
    if not headers:
        return None
    text = next((value for name, value in headers.items() if name.lower() == WAIT_HEADER.lower()), None)
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 12 and 1 <= int(text) <= MAX_WAIT_MS):
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"header {WAIT_HEADER} must be a whole number of milliseconds from 1 to {MAX_WAIT_MS}",
        )
    return int(text)


def shown_wait_s(wait_s: float) -> float:
    """How long the caller waited, for a message: its own wait where it said it and ours ended
    for it (probe56: `wait=1` was told "did not finish within 0.900 s", a figure never given)."""
    caller = caller_wait_ms.get()
    if caller is not None and wait_s < caller / 1000 and wait_s * 1000 >= caller - min(REPLY_MARGIN_MS, caller // 10):
        return caller / 1000
    return wait_s


def gateway_wait_s(own_wait_ms: int) -> float:
    """The service's SYNC wait: its own, cut short to end just before the caller's."""
    caller = caller_wait_ms.get()
    if caller is None:
        return own_wait_ms / 1000
    return max(0.0, min(own_wait_ms, caller - min(REPLY_MARGIN_MS, caller // 10))) / 1000
