"""Keep nats.micro's per-endpoint statistics (`$SRV.STATS`) true for handlers that answer later.

nats.micro counts a request's error and time only around the handler call, and only an exception
as an error. The gateway's handler hands each request to a task and returns at once (a SYNC call
waits), so it records each request's real time and error reply on the endpoint itself here, and
counts the requests it takes from the endpoint's subscription before nats.micro sees them. This
reads and writes nats.micro's private fields: one place to change if nats-py changes them.
"""

from __future__ import annotations

from typing import Any

from nats.aio.subscription import Subscription


def endpoints_by_name(micro: Any) -> dict[str, Any]:
    """A micro service's endpoint objects, by endpoint name."""
    return {endpoint._name: endpoint for endpoint in getattr(micro, "_endpoints", None) or []}


def subscription(endpoint: Any) -> Subscription | None:
    """The subscription an endpoint takes its requests from (None if it has none now)."""
    sub = getattr(endpoint, "_subscription", None)
    return sub if isinstance(sub, Subscription) else None


def count_request(endpoint: Any) -> None:
    """Count a request the endpoint's own handler did not see (the gateway took it raw)."""
    endpoint._num_requests += 1


def record_outcome(endpoint: Any, elapsed_s: float, error: str | None) -> None:
    """Add a request's handling time to its endpoint, and count its error reply if any."""
    if endpoint is None:
        return
    endpoint._processing_time += int(elapsed_s * 1e9)
    endpoint._average_processing_time = int(endpoint._processing_time / max(1, endpoint._num_requests))
    if error is not None:
        endpoint._num_errors += 1
        endpoint._last_error = error
