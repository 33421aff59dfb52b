"""One way to connect to NATS: the configured servers and credentials, reconnecting forever
(nats-py gives up after 60 tries by default, which a service must not)."""

from __future__ import annotations

import logging

from typing import Callable

from nats.aio.client import Client

from spear.config import Settings

log = logging.getLogger(__name__)


_reconnect_listeners: dict[int, list[Callable[[], None]]] = {}


def on_reconnect(nc: Client, listener: Callable[[], None]) -> None:
    """Call `listener` after `nc` reconnects (a restarted server forgets pull requests, say)."""
    _reconnect_listeners.setdefault(id(nc), []).append(listener)


async def connect(settings: Settings, name: str) -> Client:
    nc = Client()

    async def reconnected() -> None:
        log.info("nats: reconnected")
        for listener in _reconnect_listeners.get(id(nc), []):
            listener()

    async def closed() -> None:
        _reconnect_listeners.pop(id(nc), None)

    options = dict(
        servers=settings.nats.urls,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        error_cb=_log_error,
        disconnected_cb=_disconnected,
        reconnected_cb=reconnected,
        closed_cb=closed,
    )
    nats_settings = settings.nats
    if nats_settings.user:
        options.update(user=nats_settings.user, password=nats_settings.password)
    if nats_settings.token:
        options.update(token=nats_settings.token)
    if nats_settings.creds_file:
        options.update(user_credentials=nats_settings.creds_file)
    await nc.connect(**options)
    return nc


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s", exc)


async def _disconnected() -> None:
    log.warning("nats: disconnected")
