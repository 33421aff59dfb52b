"""Request-reply answered with nats-py's `Msg`, with about half the CPU of nats-py's
`Client.request`, for callers that read a reply's headers (leader reads, the bench's client). It
is `spear.jetstream.rawrequests` (one wildcard reply subscription per connection, a future per
request, a timer handle instead of `asyncio.wait_for`) with the reply's header block parsed as
nats-py parses a received message's. Errors are nats-py's own: `TimeoutError`,
`NoRespondersError` (a 503 status: nothing listens, e.g. JetStream is down),
`ConnectionClosedError`, so callers' handling (`errors.UNREACHABLE`) is unchanged.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from spear.jetstream import rawrequests, rawsub


async def request(
    nc: Client, subject: str, data: bytes = b"", timeout: float = 5.0, headers: dict[str, str] | None = None
) -> Msg:
    """Publish `data` on `subject` and return the reply, as `nc.request` does."""
    reply = await rawrequests.request(nc, subject, data, timeout, headers)
    if rawrequests.no_responders(reply):
        raise nats.errors.NoRespondersError()
    return Msg(nc, data=reply.data, headers=await rawsub.parsed_headers(nc, reply.headers))
