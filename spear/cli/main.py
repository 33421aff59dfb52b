"""`spear up | worker | gateway | projection | api | invoke | status`: where components are wired
and configuration is read (spear.toml, SPEAR_* environment, flags)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import nats.errors

from spear.cli import components
from spear.core.config import ConfigError, Settings, load_settings, with_overrides
from spear.jetstream.connection import CredentialsRefused, connect, credentials

log = logging.getLogger("spear")


# --- settings -----------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    path = Path(args.config or os.environ.get("SPEAR_CONFIG", "spear.toml"))
    text = path.read_text() if path.exists() else None
    if args.config and text is None:
        raise ConfigError(f"config file {path} not found")
    settings = load_settings(text, os.environ)
    overrides: dict[str, dict] = {}
    if getattr(args, "nats_url", None):
        overrides["nats"] = {"urls": [u.strip() for u in args.nats_url.split(",") if u.strip()]}
    if getattr(args, "http_port", None) is not None:
        overrides["api"] = {"http_port": args.http_port}
    if getattr(args, "concurrency", None):
        overrides["worker"] = {"concurrency": args.concurrency}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return with_overrides(settings, **overrides) if overrides else settings


# --- long-running components --------------------------------------------------------------------


class Lifetime:
    """Ctrl-C or SIGTERM stops a command cleanly at any moment: while serving it ends the wait in
    `serve()`; during start-up (say, NATS not reachable yet) it cancels the start-up, and the
    exit stack still stops whatever had started."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._main = asyncio.current_task()
        self._serving = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signalled)

    def _signalled(self) -> None:
        if self._serving:
            self._stop.set()
        else:
            self._main.cancel()

    async def serve(self) -> None:
        self._serving = True
        await self._stop.wait()


async def _connected(stack: AsyncExitStack, settings: Settings, name: str):
    nc = await connect(settings, name)
    stack.push_async_callback(nc.drain)
    return nc


async def run_worker(settings: Settings) -> None:
    from spear.demo import demo

    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-worker")
        worker = await components.start_worker(stack, nc, settings, [demo])
        log.info("worker %s serving tasks: %s", worker.worker_id, ", ".join(worker.tasks))
        await life.serve()


async def run_gateway(settings: Settings) -> None:
    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-gateway")
        await components.start_gateway(stack, await components.start_service(stack, nc, settings))
        log.info("gateway serving %s.api.*", settings.subject_prefix)
        await life.serve()


async def run_projection(settings: Settings, rebuild: bool) -> None:
    from spear.projection.projection import rebuild as rebuild_views

    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-projection")
        if rebuild:
            await rebuild_views(nc, settings)
            log.info("projection: read models dropped; replaying the stream")
        await components.start_projection(stack, nc, settings)
        await life.serve()


async def run_api(settings: Settings) -> None:
    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-api")
        service = await components.start_service(stack, nc, settings)
        await components.start_http(stack, service, settings.api.http_port)
        log.info("HTTP API on port %d", settings.api.http_port)
        await life.serve()


async def run_up(settings: Settings, args: argparse.Namespace) -> None:
    from spear.cli.supervisor import WorkerProcesses
    from spear.jetstream.embedded import EmbeddedNats

    life = Lifetime()
    async with AsyncExitStack() as stack:
        if not args.nats_url:
            embedded = EmbeddedNats(Path(settings.data_dir) / "nats", port=args.nats_port)
            url = await asyncio.to_thread(embedded.start)
            stack.callback(embedded.stop)
            settings = with_overrides(settings, nats={"urls": [url]})
            log.info("embedded nats-server at %s, storing under %s", url, embedded.data_dir)
        nc = await _connected(stack, settings, "spear-up")
        service = await components.start_service(stack, nc, settings)
        await components.start_gateway(stack, service)
        await components.start_projection(stack, nc, settings)
        workers = WorkerProcesses(settings, args.workers, args.config)
        await workers.start()
        stack.push_async_callback(workers.stop)
        await components.start_http(stack, service, settings.api.http_port)
        await _wait_healthy(service, expect_worker=args.workers > 0)
        print(
            f"spear is up: NATS {','.join(settings.nats.urls)}, HTTP http://127.0.0.1:{settings.api.http_port}"
            f" ({args.workers} worker process{'es' if args.workers != 1 else ''}). Ctrl-C stops it.",
            flush=True,
        )
        await life.serve()
        log.info("stopping")


async def _wait_healthy(service, expect_worker: bool, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        report = await service.health()
        if report.status == "healthy" or (not expect_worker and report.components["projection"]):
            return
        await asyncio.sleep(0.1)
    log.warning("not healthy after %.0f s: %s", timeout_s, report)


# --- one-shot commands --------------------------------------------------------------------------


def parse_parameter(text: str) -> dict:
    name, sep, raw = text.partition("=")
    if not sep:
        raise SystemExit(f"parameter {text!r} is not name=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return {"name": name, "value": value}


async def call(settings: Settings, operation: str, request: dict, timeout_s: float) -> int:
    from spear.core.names import Names

    subject = Names(settings.subject_prefix).api(operation)
    try:
        nc = await nats.connect(
            settings.nats.urls, connect_timeout=3, max_reconnect_attempts=0, **credentials(settings)
        )
    except Exception as exc:
        print(f"spear: cannot reach NATS at {','.join(settings.nats.urls)}: {exc}", file=sys.stderr)
        return 1
    try:
        reply = await nc.request(subject, json.dumps(request).encode(), timeout=timeout_s)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        print(f"spear: no reply on {subject} ({type(exc).__name__}): is `spear up` running?", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    print(json.dumps(json.loads(reply.data), indent=2))
    return 1 if reply.headers and "Nats-Service-Error-Code" in reply.headers else 0


def invoke_request(args: argparse.Namespace) -> dict:
    request = {
        "task_id": args.task_id,
        "function_name": args.function_name,
        "parameters": [parse_parameter(p) for p in args.parameters],
        "execution_mode": "ASYNC" if args.use_async else "SYNC",
        "context": {"timeout_ms": args.timeout_ms},
    }
    if args.execution_id:
        request["execution_id"] = args.execution_id
    return request


# --- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spear", description="event-sourced function invocation on NATS JetStream")
    parser.add_argument("--config", help="spear.toml to read (default ./spear.toml if present)")
    parser.add_argument("--log-level", default=os.environ.get("SPEAR_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run everything: embedded NATS, gateway, workers, projection, HTTP")
    up.add_argument("--data-dir", help="where the embedded NATS stores (default ./.spear)")
    up.add_argument("--nats-port", type=int, default=4222, help="embedded NATS port (-1: any free port)")
    up.add_argument("--http-port", type=int, default=None, help="HTTP API port (default 8080)")
    up.add_argument("--nats-url", help="use this NATS (comma-separated for a cluster) instead of embedding one")
    up.add_argument("--workers", type=int, default=1, help="worker processes (0: none, run them apart)")

    for name, text in (
        ("worker", "run a worker process"),
        ("gateway", "run the NATS request-reply gateway"),
        ("projection", "run the projection"),
        ("api", "run the HTTP API"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--nats-url")
        if name == "worker":
            sub.add_argument("--concurrency", type=int)
        if name == "api":
            sub.add_argument("--http-port", type=int, default=None)
        if name == "projection":
            sub.add_argument("--rebuild", action="store_true", help="drop the read models and replay the stream")

    invoke = commands.add_parser("invoke", help="invoke a function: spear invoke demo calculate_fibonacci n=30")
    invoke.add_argument("task_id")
    invoke.add_argument("function_name")
    invoke.add_argument("parameters", nargs="*", metavar="name=value", help="value is JSON, or else a string")
    invoke.add_argument("--async", dest="use_async", action="store_true", help="return at once with an execution_id")
    invoke.add_argument("--timeout-ms", type=int, default=0)
    invoke.add_argument("--execution-id")
    invoke.add_argument("--nats-url")

    status = commands.add_parser("status", help="show an execution's status")
    status.add_argument("execution_id")
    status.add_argument("--nats-url")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"spear: {exc}", file=sys.stderr)
        return 2
    command = args.command
    if command == "up":
        return _run(run_up(settings, args))
    if command == "worker":
        return _run(run_worker(settings))
    if command == "gateway":
        return _run(run_gateway(settings))
    if command == "projection":
        return _run(run_projection(settings, args.rebuild))
    if command == "api":
        return _run(run_api(settings))
    if command == "invoke":
        wait_s = (args.timeout_ms or settings.sync_execution.default_timeout_ms) / 1000 + 5
        return _run(call(settings, "invoke_function", invoke_request(args), wait_s))
    if command == "status":
        return _run(call(settings, "get_execution_status", {"execution_id": args.execution_id}, 10))
    return 2


def _run(coroutine) -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(coroutine) or 0
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 0  # stopped during start-up, on request
    except CredentialsRefused as exc:
        print(f"spear: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
