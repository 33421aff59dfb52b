"""One way to connect to NATS: the configured servers and credentials, reconnecting forever
(nats-py gives up after 60 tries by default, which a service must not)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.errors import AuthorizationError

from spear.core.config import Settings

log = logging.getLogger(__name__)


_reconnect_listeners: dict[int, list[Callable[[], None]]] = {}


def on_reconnect(nc: Client, listener: Callable[[], None]) -> None:
    """Call `listener` after `nc` reconnects (a restarted server forgets pull requests, say)."""
    _reconnect_listeners.setdefault(id(nc), []).append(listener)


class CredentialsRefused(ConnectionError):
    """NATS refused the configured credentials: waiting would not help, so start-up stops."""


async def connect(settings: Settings, name: str) -> Client:
    """Connect, waiting for NATS as long as it takes, except when it refuses our credentials."""
    nc = Client()
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def error(exc: Exception) -> None:
        log.warning("nats: %s", exc)
        if _is_refusal(exc) and not nc.is_connected and not refused.done():
            refused.set_result(exc)

    async def reconnected() -> None:
        log.info("nats: reconnected")
        for listener in _reconnect_listeners.get(id(nc), []):
            listener()

    async def closed() -> None:
        _reconnect_listeners.pop(id(nc), None)

    options = dict(
        credentials(settings),
        servers=settings.nats.urls,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        error_cb=error,
        disconnected_cb=_disconnected,
        reconnected_cb=reconnected,
        closed_cb=closed,
    )
    connecting = asyncio.ensure_future(nc.connect(**options))
    try:
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await nc.close()
        urls = ", ".join(settings.nats.urls)
        raise CredentialsRefused(f"NATS at {urls} refused the credentials: {refused.result()}")
    connecting.result()
    return nc


def credentials(settings: Settings) -> dict[str, object]:
    """The nats-py connect options for the configured credentials."""
    nats_settings = settings.nats
    options: dict[str, object] = {}
    if nats_settings.user:
        options.update(user=nats_settings.user, password=nats_settings.password)
    if nats_settings.token:
        options.update(token=nats_settings.token)
    if nats_settings.creds_file:
        options.update(user_credentials=nats_settings.creds_file)
    return options


def _is_refusal(exc: Exception) -> bool:
    # nats-py reports the server's -ERR as a plain Error carrying the server's words
    text = str(exc).lower()
    return isinstance(exc, AuthorizationError) or "authorization violation" in text or "authentication" in text


async def _disconnected() -> None:
    log.warning("nats: disconnected")
