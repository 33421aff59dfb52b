"""The long-running commands: `spear up | worker | gateway | projection | api`. Each connects,
starts its components on an exit stack and serves until Ctrl-C or SIGTERM. Components are
imported inside each command, so that one-shot commands start without loading the servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client

from spear.aio import DeadlinePassed, poll_until
from spear.cli import components
from spear.cli.arguments import non_negative, port, port_or_any, positive
from spear.cli.collector import FOLDING, settle_collector
from spear.cli.ports import ensure_free
from spear.cli.settings import log_format
from spear.core.config import ConfigError, NatsSettings, Settings, shown_urls, with_overrides
from spear.core.contract import GetHealthResponse
from spear.environment import keep_secrets_from_user_code
from spear.jetstream import topology
from spear.jetstream.connection import connect
from spear.telemetry.logs import announce

if TYPE_CHECKING:
    from spear.service.operations import Service

log = logging.getLogger("spear")


TASK_HELP = "serve this spear.Task, e.g. shop_module:shop (repeatable; the current directory is importable)"


def add_parsers(commands: Any) -> None:
    """Register the long-running commands on the `spear` subcommand parser."""
    up = commands.add_parser("up", help="run everything: embedded NATS, gateway, workers, projection, HTTP")
    up.add_argument("--data-dir", help="where the embedded NATS stores (default ./.spear)")
    up.add_argument(
        "--nats-port", type=port_or_any, default=4222, help="embedded NATS port (default 4222; -1: any free port)"
    )
    up.add_argument("--http-port", type=port, default=None, help="HTTP API port (default 8080)")
    up.add_argument("--nats-url", help="use this NATS (comma-separated for a cluster) instead of embedding one")
    up.add_argument(
        "--workers", type=non_negative, default=1, help="worker processes (default 1; 0: none, run them apart)"
    )
    up.add_argument(
        "--secure",
        action="store_true",
        help="embedded NATS with a user per role (least privilege, generated passwords); prints how clients connect",
    )
    up.add_argument("--task", action="append", metavar="MODULE:ATTR", help=TASK_HELP)
    _http_flags(up)

    for name, text in (
        ("worker", "run a worker process"),
        ("gateway", "run the NATS request-reply gateway"),
        ("projection", "run the projection"),
        ("api", "run the HTTP API"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--nats-url", help="NATS to use (comma-separated for a cluster)")
        if name == "worker":
            sub.add_argument(
                "--concurrency", type=positive, help="executions run at once (default [worker] concurrency)"
            )
            sub.add_argument("--task", action="append", metavar="MODULE:ATTR", help=TASK_HELP)
        if name == "api":
            sub.add_argument("--http-port", type=port, default=None, help="HTTP API port (default 8080)")
            _http_flags(sub)
        if name == "projection":
            sub.add_argument("--rebuild", action="store_true", help="drop the read models and replay the stream")


def _http_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="HTTP API address (default [api] host: 127.0.0.1)")
    parser.add_argument("--insecure", action="store_true", help="serve a non-loopback host without authentication")


def check_api_exposure(settings: Settings) -> None:
    """Refuse (ConfigError: exit 2) to serve the HTTP API on a non-loopback host without tokens."""
    from spear.api.auth import is_loopback, load_tokens
    from spear.core.tokens import TokenFormatError

    api = settings.api
    try:
        tokens = load_tokens(api)
    except (OSError, TokenFormatError) as exc:
        raise ConfigError(f"cannot read the API tokens: {exc}") from None
    if not (tokens.enabled or api.insecure or is_loopback(api.host)):
        raise ConfigError(
            f"refusing to serve the HTTP API on {api.host} without authentication: "
            "configure [api] tokens (see `spear token create`) or pass --insecure"
        )


def command(settings: Settings, args: argparse.Namespace) -> Coroutine[Any, Any, None] | None:
    """The coroutine that runs `args.command`, or None when it is not a long-running command."""
    match args.command:
        case "up":
            return run_up(settings, args)
        case "worker":
            return run_worker(settings)
        case "gateway":
            return run_gateway(settings)
        case "projection":
            return run_projection(settings, args.rebuild)
        case "api":
            return run_api(settings)
    return None


class Lifetime:
    """Ctrl-C, SIGTERM or SIGHUP stops a command cleanly at any moment: while serving it ends the wait in
    `serve()`; during start-up (say, NATS not reachable yet) it cancels the start-up, and the
    exit stack still stops whatever had started.

    A second Ctrl-C while it stops (a user who will not wait for running functions to end) stops
    it at once: what `on_force` names is done (`spear up` kills its processes), and the process
    exits; the embedded nats-server stops by its parent-death signal. SIGTERM never does that:
    systemd (its whole cgroup at once) or `pkill` may send it twice in one stop (review43). What
    ran is not lost: each running attempt is handed out again once the consumer's ack wait has
    passed, as after a crash, and counts as a lost one (WORKER_LOST), using a retry.

    SIGHUP (the terminal or ssh session a component was started from closed) stops it as SIGTERM
    does: left to its default, it killed a worker silently, and its running attempts were lost
    (WORKER_LOST, a retry used) instead of handed back (probe67). spear has no configuration to
    read again, which is what daemons often take SIGHUP for."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._main = asyncio.current_task()
        self._serving = False
        self._interrupts = 0
        self._first: signal.Signals | None = None  # the signal that began the stop
        self.on_force: list[Callable[[], None]] = []
        # done at the first stop signal, before anything awaits: what restarts processes that
        # die stops restarting them (systemd signals the whole cgroup at once: probe48)
        self.on_stop: list[Callable[[], None]] = []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signalled, sig)

    def _signalled(self, sig: signal.Signals) -> None:
        if self._first is None:
            self._first = sig
        self._interrupts += sig == signal.SIGINT
        if self._interrupts > 1:
            log.warning("stopping at once (a second Ctrl-C): running work will be handed out again")
            for force in self.on_force:
                with contextlib.suppress(Exception):
                    force()
            logging.shutdown()
            os._exit(128 + sig)  # the shell's code for a death by that signal
        for hold in self.on_stop:
            with contextlib.suppress(Exception):
                hold()
        self._stop.set()  # also if start-up goes on: a cancellation can be lost on Python 3.11
        if not self._serving and self._main is not None:
            self._main.cancel()

    def hurry_hint(self) -> str:
        """What stops the process at once, now that a signal began its stop: a second Ctrl-C
        after a Ctrl-C; after SIGTERM or SIGHUP, which never hurry a stop (a second one neither),
        two SIGINTs (`_signalled`). "" before any."""
        if self._first is None:
            return ""
        return "a second Ctrl-C stops at once" if self._first == signal.SIGINT else "SIGINT twice stops at once"

    async def serve(self, young_collections: tuple[int, int] | None = None) -> None:
        """Wait until a stop signal arrives. Start-up is over: the collector is set for serving
        (`young_collections`: how often it collects young objects; None: Python's default)."""
        self._serving = True
        settle_collector(young_collections)
        await self._stop.wait()


async def _connected(stack: AsyncExitStack, settings: Settings, name: str) -> Client:
    """Telemetry exporters as `[telemetry]` says (flushed last at exit), then the NATS connection."""
    from spear.telemetry.setup import setup as setup_telemetry  # the SDK only for long-running commands

    stack.callback(setup_telemetry(settings.telemetry, name))
    nc = await connect(settings, name)
    stack.push_async_callback(_drain, nc)
    return nc


async def _drain(nc: Client) -> None:
    """Drain the connection at exit; one whose server is gone (spear up killed with its embedded
    NATS, probe20) is closed instead: draining it raised, and the stop ended in a traceback."""
    try:
        await nc.drain()
    except nats.errors.Error:
        # nats-py's close of such a connection may raise too (uvloop: a closed transport)
        with contextlib.suppress(nats.errors.Error, ConnectionError, RuntimeError):
            await nc.close()


async def run_worker(settings: Settings) -> None:
    """`spear worker`: serve the configured tasks until stopped."""
    from spear.worker.loading import load_tasks

    # (none at all is fine where registered tasks are served: some gateway may allow registering them)
    tasks = load_tasks(settings.worker.tasks, settings.worker.demo, settings.worker.serve_registered)
    if not tasks:
        log.warning("worker: no code task (--task, [worker] demo): it serves tasks registered at run time only")
    keep_secrets_from_user_code()  # (registered code runs in this process and its children)
    life = Lifetime()
    worker = None
    try:
        async with AsyncExitStack() as stack:
            nc = await _connected(stack, settings, "spear-worker")
            # /metrics listens before the worker pulls: once it takes work, it can be scraped
            await components.start_metrics(stack, settings)
            worker = await components.start_worker(stack, nc, settings, tasks)
            log.info("worker %s serving tasks: %s", worker.worker_id, ", ".join(worker.tasks))
            await life.serve()
            worker.stop_hint = life.hurry_hint()  # (said if it waits for running attempts)
    finally:
        if worker is not None and worker.threads.overrunning:
            # Python waits at exit for every thread to end: a function that ignored its time limit
            # or a forced cancel would keep the stopped worker alive for as long as it runs
            # (probe20: still there 30 s after SIGTERM, and after spear up was killed).
            log.warning("worker: %d function(s) still run in threads: exiting without them", worker.threads.overrunning)
            logging.shutdown()
            os._exit(1 if sys.exc_info()[0] is not None else 0)


async def run_gateway(settings: Settings) -> None:
    """`spear gateway`: serve the NATS API until stopped."""
    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-gateway")
        service = await components.start_service(stack, nc, settings)
        await components.start_metrics(stack, settings, service.observe_queues)
        await components.start_gateway(stack, service)
        log.info("gateway serving %s.api.*", settings.subject_prefix)
        await life.serve()


async def run_projection(settings: Settings, rebuild: bool) -> None:
    """`spear projection`: keep the read models until stopped (`rebuild`: replay the stream first)."""
    from spear.projection.projection import rebuild as rebuild_views

    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-projection")
        # /metrics first: a port that cannot be had stops it before it drops anything (probe36)
        await components.start_metrics(stack, settings)
        if rebuild:
            await rebuild_views(nc, settings)
            log.info("projection: read models dropped")
        await components.start_projection(stack, nc, settings)
        await life.serve(young_collections=FOLDING)
        log.info("projection: stopping")


async def run_api(settings: Settings) -> None:
    """`spear api`: serve the HTTP API until stopped."""
    check_api_exposure(settings)
    ensure_free(settings.api.http_port, "HTTP", settings.api.host)
    life = Lifetime()
    async with AsyncExitStack() as stack:
        nc = await _connected(stack, settings, "spear-api")
        service = await components.start_service(stack, nc, settings)
        runner = await components.start_http(stack, service, settings.api.http_port)
        log.info("HTTP API on %s", components.http_url(settings.api.host, components.bound_port(runner)))
        await life.serve()


def _embedding_fits(settings: Settings, nats_port: int) -> None:
    """`spear up` without --nats-url embeds one nats-server (CONTRACT §6): say so where the
    settings name another NATS than the one embedded on `nats_port`, and refuse replicas a single
    server cannot hold (probe36: 60 s of retries, then a traceback)."""
    if settings.nats.stream_replicas > 1:
        raise ConfigError(
            f"nats.stream_replicas = {settings.nats.stream_replicas} needs a NATS cluster, but `spear up` "
            "without --nats-url embeds a single nats-server: give the cluster's URLs with --nats-url, "
            "or set stream_replicas = 1"
        )
    if settings.nats.urls != NatsSettings().urls and not all(_embedded(url, nats_port) for url in settings.nats.urls):
        log.warning(
            "spear up embeds its own nats-server (no --nats-url) on %s: the NATS of [nats] urls / "
            "SPEAR_NATS_URL (%s) is not used; `spear up --nats-url URL` uses it, `--nats-port N` moves the "
            "embedded one",
            f"port {nats_port}" if nats_port > 0 else "a free port",
            shown_urls(settings.nats.urls, ","),
        )


def _embedded(url: str, nats_port: int) -> bool:
    """Whether `url` names the server spear up embeds on `nats_port` (loopback, 4222 by default)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        port = parts.port or 4222
    except ValueError:
        return False
    return (parts.hostname or "").lower() in ("127.0.0.1", "localhost") and port == nats_port


async def run_up(settings: Settings, args: argparse.Namespace) -> None:
    """`spear up`: everything in one command (embedded NATS unless a URL is given)."""
    from spear.cli.bench import free_port
    from spear.cli.lifelines import DataDirLock, DataDirUnusable, made_dir, unusable
    from spear.cli.supervisor import ChildProcesses, NatsKeeper
    from spear.core.names import Names
    from spear.jetstream.embedded import EmbeddedNats, role_passwords
    from spear.jetstream.permissions import ROLES, authorization_block
    from spear.orphans import die_with_parent
    from spear.worker.loading import load_tasks

    check_api_exposure(settings)
    # Imported here too, so that a bad spec stops `spear up` at once rather than its workers over and
    # over; the service runs SYNC calls of their inline functions itself (spear.service.inline).
    registered = settings.worker.serve_registered and settings.tasks.allow_registration
    tasks = load_tasks(settings.worker.tasks, settings.worker.demo, registered)
    if args.secure and args.nats_url:
        raise ConfigError("--secure sets up the embedded nats-server; for your own, see deploy/ (spear nats-users)")
    if not args.nats_url:
        _embedding_fits(settings, args.nats_port)
        # Checked before anything starts, so that a taken port leaves nothing to stop.
        ensure_free(args.nats_port, "NATS", "127.0.0.1")
    ensure_free(settings.api.http_port, "HTTP", settings.api.host)
    life = Lifetime()
    async with AsyncExitStack() as stack:
        passwords: dict[str, str] = {}
        if not args.nats_url:
            nats_dir = Path(settings.data_dir) / "nats"
            extra_config = ""
            # (first: a data dir in use is said so, not mistaken for one to be started: review27)
            lock = DataDirLock(settings.data_dir)
            lock.acquire()
            stack.callback(lock.release)
            assert lock.fd is not None
            made_dir(nats_dir)  # (a file named `nats` there: one line, not a traceback: probe67)
            if args.secure:
                passwords = role_passwords(nats_dir / "credentials.json", ROLES)
                extra_config = authorization_block(Names(settings.subject_prefix), passwords)
                # the client role may invoke but not register: invoke_function must not register either
                settings = with_overrides(settings, tasks={"nats_invoke_registers": False})
            elif (nats_dir / "credentials.json").exists():  # (probe30: a restored one was served with no users)
                raise ConfigError(
                    f"{settings.data_dir} was served with --secure (its roles' passwords are in "
                    f"{nats_dir / 'credentials.json'}): start it with --secure, or remove that file to serve it "
                    "with no NATS users"
                )
            embedded = EmbeddedNats(
                nats_dir,
                port=args.nats_port,
                extra_config=extra_config,
                preexec_fn=die_with_parent(),
                pass_fds=(lock.fd,),
            )
            try:
                embedded.spawn()  # from this (the main) thread: the server's parent-death signal follows it
            except OSError as exc:  # its files under the data dir cannot be written: a bad setting too
                if not str(exc.filename or "").startswith(str(embedded.data_dir)):
                    raise  # (not the data dir's fault: the nats-server binary, say)
                raise DataDirUnusable(unusable(embedded.data_dir, exc)) from None
            stack.callback(embedded.stop)
            url = await asyncio.to_thread(embedded.wait_ready)
            settings = with_overrides(settings, nats={"urls": [url]})
            log.info("embedded nats-server at %s, storing under %s", url, embedded.data_dir)
            keeper = NatsKeeper(embedded)
            keeper.start()
            stack.push_async_callback(keeper.stop)  # before the server is stopped (last in, first out)
            life.on_stop.append(keeper.hold)

        def as_role(role: str) -> Settings:
            """With --secure each component connects as its own NATS user."""
            return with_overrides(settings, nats={"user": role, "password": passwords[role]}) if passwords else settings

        # The streams first, before any process: what keeps the NATS from holding them (no
        # JetStream, too few peers) is said once, by spear up, not by each of its processes.
        nc = await _connected(stack, as_role("gateway"), "spear-up")
        await topology.ensure_base(nc, Names(settings.subject_prefix), settings.nats.stream_replicas)
        # Child processes next: their start-up (mostly imports) overlaps this process's own. The
        # projection runs in a process of its own, so that it and the gateway use both cores;
        # spear up's /metrics includes the execution metrics it serves on a loopback port.
        projection_metrics = free_port()
        projection = ChildProcesses(
            as_role("projection"),
            1,
            args.config,
            component="projection",
            metrics_port=projection_metrics,
            nice=settings.projection.nice,
        )
        await projection.start()
        stack.push_async_callback(projection.stop)
        workers = ChildProcesses(as_role("worker"), args.workers, args.config, nice=settings.worker.nice)
        await workers.start()
        stack.push_async_callback(workers.stop)
        # (a second Ctrl-C may come before they were told to stop: their parent-death signal would
        # then start a clean stop of theirs, orphaned, with NATS gone: review43)
        life.on_force += [workers.kill, projection.kill]
        life.on_stop += [workers.hold, projection.hold]
        service = await components.start_service(stack, nc, as_role("gateway"), inline_tasks=tasks)
        gateway = await components.start_gateway(stack, service)
        merged = (f"http://127.0.0.1:{projection_metrics}/metrics",)
        runner = await components.start_http(stack, service, settings.api.http_port, merged_metrics=merged)
        # At a stop, NATS calls are refused from the start too, not taken while the HTTP API
        # gives its SYNC callers the stop grace
        stack.push_async_callback(gateway.stop_taking)
        await _wait_healthy(service, expect_worker=args.workers > 0)
        nats_urls = shown_urls(settings.nats.urls, ",")
        http = components.http_url(settings.api.host, components.bound_port(runner))
        announce(
            f"spear is up: NATS {nats_urls}, HTTP {http}"
            f" ({args.workers} worker process{'es' if args.workers != 1 else ''}). Ctrl-C stops it.",
            log_format(args),
            nats_url=nats_urls,
            http_url=http,
            workers=args.workers,
        )
        if passwords:
            # The password itself only to a terminal: stdout that is a pipe or a file ends up in
            # logs (probe54: systemd's journal kept it); the file is the user's alone (0600).
            password = passwords["client"] if sys.stdout.isatty() else "<password>"
            client_url = settings.nats.urls[0].replace("://", f"://client:{password}@", 1)
            announce(
                f"NATS clients connect as user client: {client_url} "
                f"(every role's password: {embedded.data_dir / 'credentials.json'})",
                log_format(args),
            )
        await life.serve()
        log.info("stopping (%s)", life.hurry_hint())


async def _wait_healthy(service: Service, expect_worker: bool, timeout_s: float = 30.0) -> None:
    """Return once spear serves (without workers: once a projection answers); warn if it does not."""

    def serving(report: GetHealthResponse) -> bool:
        return report.status == "healthy" or (not expect_worker and report.components["projection"])

    try:
        await poll_until(service.health, serving, timeout_s=timeout_s, what="healthy")
    except DeadlinePassed as exc:
        log.warning("not healthy after %.0f s: %s", timeout_s, exc.last)
