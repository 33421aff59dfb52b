"""What the HTTP application holds for its handlers (aiohttp application keys)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from spear.service.operations import Service

SERVICE = web.AppKey("service", Service)
OPENAPI = web.AppKey("openapi", bytes)
# Other processes' /metrics that this /metrics includes (spear up's projection process).
MERGED_METRICS: web.AppKey[tuple[str, ...]] = web.AppKey("merged_metrics")
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping")  # set when the server stops: SSE streams end
