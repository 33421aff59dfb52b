"""`spear up`'s child processes (its workers, its projection, its embedded nats-server): start N
`spear <component>` children, restart any that dies, and stop them with SIGTERM (a worker's
running executions get a grace period; the rest is redelivered)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from spear.cli import priority
from spear.core.config import Settings, meant_settings
from spear.interpreter import PYTHON
from spear.jetstream.embedded import EmbeddedNats
from spear.orphans import die_with_parent

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
CHECK_S = 0.25  # how often the processes are looked at
# A process that ended as a stopped one does (exit 0, or SIGTERM / SIGINT) is started again only
# after this long without spear up being stopped too: systemd signals the whole cgroup at once,
# and a child may end before spear up has read its own signal (probe48: restarts while stopping).
STOPPED_LIKE_S = 1.0


NATS_RESTART_MAX_S = 30.0  # the longest pause between tries to start the embedded server again
NATS_READY_S = 300.0  # how long a restarted server may take to listen (a store recovering after a crash)


def ended_as_stopped(returncode: int | None) -> bool:
    """Whether a process ended as one that was told to stop does."""
    return returncode in (0, -signal.SIGTERM, -signal.SIGINT)


class NatsKeeper:
    """`spear up`'s embedded nats-server, started again if it dies (same store, same port; after
    RESTART_DELAY_S, then twice as long after each failed try, up to NATS_RESTART_MAX_S): the
    components reconnect to it on their own, and nothing stored is lost (JetStream's store is on
    disk). Health says NATS is unreachable meanwhile."""

    def __init__(self, server: EmbeddedNats, check_every_s: float = 0.5):
        self.server = server
        self.check_every_s = check_every_s
        self.restarts = 0
        self.held = False  # spear up is stopping: the server is not started again
        # a restart listens where the first start did (`--nats-port -1` chose a free one)
        self.server.port = int(server.url.rsplit(":", 1)[1])
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Watch the server from now on."""
        self._watch = asyncio.get_running_loop().create_task(self._keep_running())

    async def _keep_running(self) -> None:
        pause_s = RESTART_DELAY_S
        while True:
            await asyncio.sleep(self.check_every_s)
            process = self.server.process
            if process is None or process.poll() is None or self.held:
                continue
            if ended_as_stopped(process.returncode):
                await asyncio.sleep(STOPPED_LIKE_S)
                if self.held:
                    continue
            log.error("the embedded nats-server exited (%s); starting it again on the same store", process.returncode)
            await asyncio.sleep(pause_s)
            if self.held:  # (spear up was told to stop meanwhile)
                continue
            try:
                self.server.spawn()  # on the loop's (main) thread: its parent-death signal follows spear up
                await asyncio.to_thread(self.server.wait_ready, NATS_READY_S)
            except Exception as exc:  # the port taken meanwhile, the store unusable, ...: try again later
                log.error("the embedded nats-server did not start again (next try in %.0f s): %s", pause_s * 2, exc)
                pause_s = min(NATS_RESTART_MAX_S, pause_s * 2)
                continue
            pause_s = RESTART_DELAY_S
            self.restarts += 1
            log.warning("the embedded nats-server is back at %s", self.server.url)

    def hold(self) -> None:
        """spear up is stopping: start the server again no more."""
        self.held = True

    async def stop(self) -> None:
        """Stop watching (before the server is stopped)."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)


class ChildProcesses:
    """`spear up`'s child processes (workers, or other components): started, restarted when they
    die, stopped with it."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        config_path: str | None = None,
        component: str = "worker",
        metrics_port: int = 0,
        nice: int = 0,
    ):
        self.settings = settings
        self.count = count
        self.config_path = config_path
        self.component = component
        self.metrics_port = metrics_port
        self.nice = nice  # the children's scheduling priority (priority.py)
        self.processes: list[asyncio.subprocess.Process] = []
        self._lowering: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def command(self) -> list[str]:
        """The command line of one worker process."""
        config = ["--config", self.config_path] if self.config_path else []
        tasks = [arg for spec in self.settings.worker.tasks for arg in ("--task", spec)]
        if self.component != "worker":
            tasks = []
        return [
            *PYTHON,
            "-m",
            "spear",
            *config,
            self.component,
            *tasks,
        ]

    def environment(self) -> dict[str, str]:
        """The environment of one worker process: spear up's, with where and how to connect.
        The NATS URLs go here, never on the command line, which any local user can read (`ps`):
        one may hold a password (review27), as --secure's logins do."""
        env = {**os.environ, "SPEAR_SUBJECT_PREFIX": self.settings.subject_prefix}
        for variable, _ in meant_settings(env):  # (ignored: said once, by spear up, not by each process)
            env.pop(variable)
        env.pop("SPEAR_NATS__URLS", None)  # (SPEAR_NATS_URL alone says them: no two to choose from)
        env["SPEAR_NATS_URL"] = ",".join(self.settings.nats.urls)
        if self.settings.nats.user:  # spear up --secure: the role's login
            env.update(SPEAR_NATS__USER=self.settings.nats.user, SPEAR_NATS__PASSWORD=self.settings.nats.password or "")
        # /metrics is served by spear up itself. Worker processes export over OTLP when configured,
        # and never contend for one metrics port; the projection serves its execution metrics on a
        # loopback port of its own, which spear up's /metrics includes.
        env["SPEAR_TELEMETRY__METRICS_PORT"] = str(self.metrics_port)
        if self.metrics_port:
            env["SPEAR_API__HOST"] = "127.0.0.1"
        return env

    async def start(self) -> None:
        """Start the processes and watch them."""
        self.processes = [await self._spawn() for _ in range(self.count)]
        self._watch = asyncio.get_running_loop().create_task(self._restart_dead())

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = self.environment()
        # Own session: a terminal Ctrl-C reaches spear up only, which stops workers in order; and
        # SIGTERM when spear up dies, however it dies (lifelines.py): never an orphan.
        process = await asyncio.create_subprocess_exec(
            *self.command(),
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # only a prctl call
        )
        # Beside the start-up, not before it: an autogroup change may have to wait its turn.
        lowering = asyncio.get_running_loop().create_task(priority.lower(process.pid, self.nice))
        self._lowering.add(lowering)
        lowering.add_done_callback(self._lowering.discard)
        return process

    async def _restart_dead(self) -> None:
        """Start again each process that died, RESTART_DELAY_S after it was seen dead (one that
        ended as a stopped one does: STOPPED_LIKE_S later still, unless spear up is stopping)."""
        seen_dead: dict[int, float] = {}  # pid -> when it was first seen dead
        while not self._stopping:
            await asyncio.sleep(CHECK_S)
            now = time.monotonic()
            for index, process in enumerate(self.processes):
                if process.returncode is None:
                    continue
                since = seen_dead.setdefault(process.pid, now)
                wait_s = RESTART_DELAY_S + (STOPPED_LIKE_S if ended_as_stopped(process.returncode) else 0.0)
                if now - since >= wait_s and not self._stopping:
                    del seen_dead[process.pid]
                    log.warning(
                        "%s process %d exited with %s; starting another",
                        self.component,
                        process.pid,
                        process.returncode,
                    )
                    self.processes[index] = await self._spawn()

    def hold(self) -> None:
        """spear up is stopping: start no process again (`stop` stops them)."""
        self._stopping = True

    def kill(self) -> None:
        """Kill every process now (SIGKILL): a forced stop, which waits for nothing."""
        self._stopping = True
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # (one gone meanwhile: the others still)
                    process.kill()

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after `timeout_s`)."""
        self._stopping = True
        if self._watch:
            self._watch.cancel()
        for lowering in self._lowering:
            lowering.cancel()
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                process.kill()
                await process.wait()
