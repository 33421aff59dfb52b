"""Prometheus metrics over HTTP: the API's `/metrics` (its own, and those of the processes it
includes), and the metrics-only application of the components that serve no API."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from spear.api.http.keys import MERGED_METRICS, SERVICE
from spear.telemetry.metrics import merge_exposition, prometheus_text

log = logging.getLogger(__name__)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus exposition."""
    await request.app[SERVICE].observe_queues()  # the queue gauges as of this scrape
    body, content_type = prometheus_text()
    for url in request.app.get(MERGED_METRICS, ()):
        body = merge_exposition(body, await _scrape(url))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _scrape(url: str) -> bytes:
    """Another process's /metrics; nothing if it does not answer (a restarting child)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(url) as response,
        ):
            return await response.read() if response.status == 200 else b""
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("http: %s not scraped: %s", url, exc)
        return b""


def create_metrics_app(refresh: Callable[[], Awaitable[None]] | None = None) -> web.Application:
    """Only `GET /metrics`: for components that do not serve the API (worker, gateway, projection)."""

    async def metrics_only(request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        body, content_type = prometheus_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics_only)
    return app
