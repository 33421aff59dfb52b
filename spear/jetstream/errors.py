"""The nats-py errors that mean "NATS is not reachable right now" (as opposed to a refusal)."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client

# A request that met one of these may work later: nothing answered, in time or at all.
UNREACHABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
)


def permission_denied(nc: Client, subject: str) -> str | None:
    """What to say when a request on `subject` went unanswered because the server refused it:
    NATS drops a denied publish and says so only asynchronously (-ERR), so the request would
    otherwise look like a timeout. None when the last error is no such refusal."""
    error = str(nc.last_error or "")
    if "permissions violation" in error.lower() and subject.lower() in error.lower():
        return f"permission denied: this NATS user may not publish to {subject} ({error.removeprefix('nats: ')})"
    return None
