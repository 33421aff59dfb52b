"""Connecting to NATS for the client: within a time limit, and failing fast and clearly (one
`Unavailable` or `Unauthenticated` naming the servers and why) rather than retrying forever."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.client import Client as Nats

from spear import errors
from spear.client.wire import describe
from spear.core.config import shown_urls
from spear.jetstream import tlsguard
from spear.jetstream.connection import MAX_OUTSTANDING_PINGS, PING_INTERVAL_S, is_refusal


async def open_connection(servers: list[str], credentials: dict[str, Any], name: str, connect_timeout: float) -> Nats:
    """A NATS connection within `connect_timeout`, reconnecting on its own once made; else
    `Unavailable` (or `Unauthenticated`) naming the servers and why."""
    tlsguard.install()
    nc = Nats()
    failures: list[BaseException] = []
    # Credentials refused, or every server refused twice: waiting would not help a command line.
    hopeless = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        failures.append(exc)  # told in the Unavailable message (nats-py would log a traceback)
        refused = is_refusal(exc) and not nc.is_connected
        # A reset or a broken pipe may hide a refusal (the server closed before its -ERR, or its
        # TLS alert, was read): try again.
        tries = sum(not isinstance(failure, _CUT_OFF) for failure in failures)
        if (refused or tries >= 2 * len(servers)) and not hopeless.done():
            hopeless.set_result(None)

    options: dict[str, Any] = dict(
        credentials,
        servers=servers,
        name=name,
        connect_timeout=max(0.2, min(1.0, connect_timeout / 2)),
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        ping_interval=PING_INTERVAL_S,  # a frozen server is left within seconds, not minutes
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        error_cb=on_error,
    )
    connecting = asyncio.ensure_future(nc.connect(**options))
    try:
        await asyncio.wait({connecting, hopeless}, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
    failure = connecting.exception() if connecting.done() and not connecting.cancelled() else None
    if not connecting.done() or connecting.cancelled() or failure is not None:
        with contextlib.suppress(Exception):
            await nc.close()
        why = failures[-1] if failures else failure or TimeoutError()
        urls = shown_urls(servers, ",")
        refusal = next((exc for exc in failures if is_refusal(exc)), None)
        if refusal is not None:
            raise errors.Unauthenticated(f"NATS at {urls} refused the credentials or TLS: {describe(refusal)}")
        hint = ""
        if "tls" in credentials and failures and all(isinstance(exc, _CUT_OFF) for exc in failures):
            hint = " (over TLS: a server that wants a client certificate cuts the connection so; see [nats] tls_cert)"
        raise errors.Unavailable(f"cannot reach NATS at {urls}: {describe(why)}{hint}")
    return nc


_CUT_OFF = (ConnectionResetError, BrokenPipeError)  # the server closed the connection on us
