"""W3C trace context for events: continue the caller's trace, or start one.

Each invocation gets a `traceparent` that its events carry in their NATS headers, so one
execution's events, across gateway and workers, belong to one trace.
"""

from __future__ import annotations

import os
import re

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def child_traceparent(incoming: str | None) -> str:
    """A new span id under the incoming trace, or a new trace if there is none (or it is malformed)."""
    match = TRACEPARENT.match(incoming or "")
    trace_id = match.group(1) if match and set(match.group(1)) != {"0"} else os.urandom(16).hex()
    flags = match.group(3) if match else "01"
    return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"
