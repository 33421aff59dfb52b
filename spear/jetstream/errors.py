"""The nats-py errors that mean "NATS is not reachable right now" (as opposed to a refusal)."""

from __future__ import annotations

import nats.errors

# A request that met one of these may work later: nothing answered, in time or at all.
UNREACHABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
)
