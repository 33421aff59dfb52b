"""The `spear bench` command: its options, the spear up it starts, the run and its output."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import nats

from spear.cli.bench.measure import CpuMeter, progress
from spear.cli.bench.phases import Bench
from spear.cli.bench.plan import FULL, QUICK, TARGETS, WINDOW
from spear.cli.bench.report import met, ratios, render
from spear.core.config import Settings
from spear.interpreter import PYTHON
from spear.jetstream import headers, pongs, wireparser
from spear.orphans import die_with_parent


def add_parser(commands: Any) -> None:
    """Add `spear bench` and its options to the command parsers."""
    bench = commands.add_parser(
        "bench",
        help="measure spear (SYNC latency, ASYNC and status rates, rebuild) against raw NATS",
        description="Starts a `spear up` of its own unless --nats-url is given. Progress on stderr.",
    )
    bench.add_argument("--nats-url", help="bench the spear at this NATS instead of starting one")
    bench.add_argument("--http-url", help="its HTTP API (with --nats-url; without it the HTTP figures are skipped)")
    # Issue 11's figures are those of `spear up --workers 2`: one worker per core of its machine.
    bench.add_argument("--workers", type=int, default=2, help="worker processes of the spear up it starts (2)")
    bench.add_argument("--quick", action="store_true", help="a short run (a few seconds per phase)")
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")


def command(settings: Settings, args: argparse.Namespace) -> Coroutine[Any, Any, int] | None:
    """The coroutine that runs `spear bench`, or None for another command."""
    if args.command != "bench":
        return None
    return run_bench(settings, args)


def free_port() -> int:
    """A TCP port free on the loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _appending(path: Path) -> BinaryIO:
    return open(path, "ab")  # a local file: opening it does not block the loop noticeably


async def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """`spear bench`: measure raw NATS and spear, print the figures; the exit code."""
    plan = QUICK if args.quick else FULL
    figures: dict[str, Any] = {"plan": asdict(plan), "window": WINDOW}
    async with contextlib.AsyncExitStack() as stack:
        meter = CpuMeter(None)
        if args.nats_url:
            nats_url, http_url = args.nats_url.split(",")[0], args.http_url
        else:
            nats_url, http_url, healthy_s, pid = await _own_spear(stack, args)
            figures["healthy_s"] = round(healthy_s, 3)
            meter = CpuMeter(pid)
        # The client a spear SDK connects (spear.jetstream.connection): spear's protocol parser, for
        # the raw figures and spear's alike. Its CPU is taken from the cores spear is measured on.
        headers.install()
        wireparser.install()
        pongs.install()
        nc = await nats.connect(nats_url, name="spear-bench", max_reconnect_attempts=1)
        stack.push_async_callback(nc.close)
        bench = Bench(nc, nats_url, settings, http_url, plan, meter)
        figures["raw"] = await bench.raw_nats()
        figures.update(await bench.spear())
    figures["ratios"] = ratios(figures)
    figures["targets"] = {
        name: {"target": t, "met": met(figures.get(name), t, way)} for name, (t, way) in TARGETS.items()
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(render(figures))
    return 0


async def _own_spear(stack: contextlib.AsyncExitStack, args: argparse.Namespace) -> tuple[str, str, float, int]:
    """Start `spear up` (temporary data dir, free ports); return its URLs and its time to healthy."""
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spear-bench-")))
    http_port = free_port()
    argv = [*PYTHON, "-m", "spear", *(["--config", args.config] if args.config else [])]
    argv += ["up", "--data-dir", str(data_dir), "--nats-port", "-1", "--http-port", str(http_port)]
    argv += ["--workers", str(args.workers)]
    progress(f"starting {' '.join(argv[len(PYTHON) + 2 :])} (its log: {data_dir / 'up.log'})")
    began = time.perf_counter()
    with _appending(data_dir / "up.log") as log_file:  # the child keeps its own descriptor
        # In a session of its own, as a service runs: where the kernel shares CPU between
        # sessions first (autogroups, spear/cli/priority.py), the bench's client would otherwise
        # share the gateway's share. It is stopped with the bench (SIGTERM), however that ends.
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    stop_on_close(stack, process)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    healthy_s = time.perf_counter() - began
    match = re.search(r"NATS (nats://\S+), HTTP (http://\S+) ", line)
    if not match:
        tail = (data_dir / "up.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"spear up did not start (exit {process.returncode}): {line!r}\n{tail}")
    progress(f"healthy after {healthy_s:.2f} s")
    return match.group(1), match.group(2), healthy_s, process.pid


def stop_on_close(stack: contextlib.AsyncExitStack, process: asyncio.subprocess.Process) -> None:
    """Stop `process` when `stack` closes: SIGTERM, then SIGKILL if it has not ended in 30 s."""

    async def stop() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()

    stack.push_async_callback(stop)
