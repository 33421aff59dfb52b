"""Start spear's components on a NATS connection; each registers its stop on an AsyncExitStack,
so they stop in reverse order of starting. Used by the CLI and by the tests alike.

Each component's modules are imported when it is started: `spear up` starts its worker and
projection processes with `python -m spear worker|projection`, and a process that imports only
what it runs starts ~0.15 s of CPU sooner (no HTTP server, gateway or service layer to load)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from nats.aio.client import Client

from spear.cli.ports import PortInUse, is_in_use
from spear.core.config import STOP_GRACE_S, Settings

if TYPE_CHECKING:
    from aiohttp import web

    from spear.api.gateway import Gateway
    from spear.projection.projection import Projection
    from spear.service.operations import Service
    from spear.worker.tasks import Task
    from spear.worker.worker import Worker

# How long a stopping HTTP API waits for requests in flight: aiohttp waits that long for a
# handler, then as long again once it cancelled it. SYNC callers are answered within the stop
# grace (`Service.end_waits`), a little before.
HTTP_STOP_S = STOP_GRACE_S + 0.5


async def start_service(
    stack: AsyncExitStack, nc: Client, settings: Settings, inline_tasks: list[Task] | None = None
) -> Service:
    """Start the service layer (topology, task directory, completions); SYNC calls of the inline
    functions of `inline_tasks` (loaded in this process) are run by it."""
    from spear.service.operations import Service

    service = Service(nc, settings, inline_tasks=inline_tasks or ())
    await service.start()
    stack.push_async_callback(service.stop)
    return service


async def start_gateway(stack: AsyncExitStack, service: Service) -> Gateway:
    """Start the NATS gateway on `service`."""
    from spear.api.gateway import Gateway

    gateway = Gateway(service.nc, service)
    await gateway.start()
    stack.push_async_callback(gateway.stop)
    return gateway


async def start_projection(stack: AsyncExitStack, nc: Client, settings: Settings) -> Projection:
    """Start a projection."""
    from spear.projection.projection import Projection

    projection = Projection(nc, settings)
    await projection.start()
    stack.push_async_callback(projection.stop)
    return projection


async def start_worker(stack: AsyncExitStack, nc: Client, settings: Settings, tasks: list[Task]) -> Worker:
    """Start a worker serving `tasks`."""
    from spear.worker.worker import Worker

    worker = Worker(nc, settings, tasks)
    await worker.start()
    stack.push_async_callback(worker.stop)
    return worker


def bound_port(runner: web.AppRunner) -> int:
    """The port the HTTP API listens on: the one asked for, or the one the system chose for 0."""
    address = runner.addresses[0]
    return int(address[1])


def http_url(host: str, port: int) -> str:
    """The HTTP API's URL (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_http(
    stack: AsyncExitStack, service: Service, port: int, host: str | None = None, merged_metrics: tuple[str, ...] = ()
) -> web.AppRunner:
    """The HTTP API on `host` (default `[api] host`, loopback unless configured otherwise);
    its /metrics includes those at `merged_metrics` (spear up's projection process)."""
    from aiohttp import web

    from spear.api.badrequests import quiet_bad_requests
    from spear.api.connections import GuardedRunner
    from spear.api.http import create_app

    host = service.settings.api.host if host is None else host
    quiet_bad_requests()
    # A stop gives requests in flight HTTP_STOP_S (aiohttp's default is a minute: a soak saw a
    # stop wait 69 s for a statistics scan), as the NATS gateway gives its own 5 s.
    runner = GuardedRunner(create_app(service, merged_metrics), access_log=None, shutdown_timeout=HTTP_STOP_S)
    await runner.setup()

    async def stop() -> None:
        # SYNC callers still waiting are answered (DEADLINE_EXCEEDED, with their execution id)
        # before aiohttp closes on them (probe27: cut off without a reply).
        await asyncio.gather(service.end_waits(), runner.cleanup())

    stack.push_async_callback(stop)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        if is_in_use(exc):
            raise PortInUse(port, "HTTP") from None
        raise
    return runner


async def start_metrics(
    stack: AsyncExitStack, settings: Settings, refresh: Callable[[], Awaitable[None]] | None = None
) -> web.AppRunner | None:
    """`GET /metrics` alone on `[telemetry] metrics_port`, for a component without the HTTP API."""
    port = settings.telemetry.metrics_port
    if not port:
        return None
    from aiohttp import web

    from spear.api.badrequests import quiet_bad_requests
    from spear.api.http import create_metrics_app

    quiet_bad_requests()
    runner = web.AppRunner(create_metrics_app(refresh), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    try:
        await web.TCPSite(runner, settings.api.host, port).start()
    except OSError as exc:
        if is_in_use(exc):
            raise PortInUse(port, "metrics") from None
        raise
    return runner
