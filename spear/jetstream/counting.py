"""How many stored messages match a subject filter, counted by the server.

A consumer made only to be asked says in its creation reply how many messages it would deliver
(`num_pending`): nats-server counts them from its index of subjects, without reading a message.
The consumer is ephemeral, unacknowledged, in memory, of one replica, and the server drops it
once nobody has pulled from it for INACTIVE_S (it is never pulled from). The cost grows with the
subjects the filter matches, in Go: 200,000 executions stored, a filter matching 180,000 of them
took ~31 ms, where reading their 180,000 states took ~5 s.
"""

from __future__ import annotations

from nats.aio.client import Client

from spear.core.eventstore import StoreError
from spear.jetstream import topology

INACTIVE_S = 1.0


async def count_matching(nc: Client, stream: str, subject_filter: str, timeout: float) -> int:
    """How many messages of `stream` match `subject_filter` now. StoreUnavailable if JetStream
    does not answer; StoreError if it refuses."""
    subject = f"CONSUMER.CREATE.{stream}"
    config = {
        "filter_subject": subject_filter,
        "deliver_policy": "all",
        "ack_policy": "none",
        "inactive_threshold": int(INACTIVE_S * 1e9),
        "mem_storage": True,
        "num_replicas": 1,
    }
    reply = await topology.read_request(nc, subject, {"stream_name": stream, "config": config}, timeout)
    pending = reply.get("num_pending")
    if not isinstance(pending, int):
        raise StoreError(f"a count of {stream} was answered without num_pending: {str(reply)[:200]}")
    return pending
