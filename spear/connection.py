"""One way to connect to NATS: the configured servers and credentials, reconnecting forever
(nats-py gives up after 60 tries by default, which a service must not)."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

from spear.config import Settings

log = logging.getLogger(__name__)


async def connect(settings: Settings, name: str) -> Client:
    options = dict(
        servers=settings.nats.urls,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        error_cb=_log_error,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
    )
    nats_settings = settings.nats
    if nats_settings.user:
        options.update(user=nats_settings.user, password=nats_settings.password)
    if nats_settings.token:
        options.update(token=nats_settings.token)
    if nats_settings.creds_file:
        options.update(user_credentials=nats_settings.creds_file)
    return await nats.connect(**options)


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s", exc)


async def _disconnected() -> None:
    log.warning("nats: disconnected")


async def _reconnected() -> None:
    log.info("nats: reconnected")
