"""`spear bench --quick --json` against a spear up of its own: every figure is there, every ASYNC
execution completed, and no figure is grossly off. "Grossly" is 10x worse than the level spear
reached when this guard was written (docs/performance.md), not 10x worse than issue 11's targets:
spear is still further than that from some targets, and a guard must pass until something breaks.
Rates and latencies are compared with the raw NATS figures of the same run where they can be, so
that a loaded machine slows both sides and the guard does not fail on noise."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from spear.cli.bench.command import free_port
from spear.cli.bench.phases import _responder

pytestmark = pytest.mark.slow

# figure -> (measured level when written, on a loaded 2-core machine; "min" or "max")
LEVELS: dict[str, tuple[float, str]] = {
    "ratios.sync_nats_p50_in_round_trips": (40, "max"),
    "ratios.async_accepted_of_publish_rate": (0.05, "min"),
    "ratios.async_completed_of_publish_rate": (0.05, "min"),
    "ratios.status_nats_of_request_rate": (0.15, "min"),
    "status_http_per_s": (250, "min"),
    "rebuild_events_per_s": (1500, "min"),
    "healthy_s": (9, "max"),
}
GROSS = 10


def figure(figures: dict, name: str) -> float:
    value = figures
    for part in name.split("."):
        value = value[part]
    return float(value)  # type: ignore[arg-type]


async def test_quick_bench_reports_every_figure_and_no_gross_regression(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spear", "bench", "--quick", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 240)
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert b"bench: SYNC over NATS" in stderr  # progress is shown
    figures = json.loads(stdout)
    assert figures["async_not_completed"] == 0 and figures["async_given_up"] == 0
    assert figures["raw"]["request_reply_p50_ms"] > 0 and figures["raw"]["publish_per_s"] > 0
    assert set(figures["targets"]) >= {"sync_nats_p50_ms", "async_accepted_per_s", "rebuild_events_per_s"}
    assert figures["cpu_ms_per_async_execution"]["spear"] > 0
    off = {}
    for name, (level, way) in LEVELS.items():
        value = figure(figures, name)
        if (value > level * GROSS) if way == "max" else (value < level / GROSS):
            off[name] = value
    assert not off, f"10x worse than the level measured when written: {off} (raw NATS: {figures['raw']})"


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _running(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie has: nobody may reap it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_the_spear_up_of_a_bench_runs_in_its_own_session_and_ends_with_the_bench(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spear", "bench", "--quick", "--json",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    assert process.stderr is not None
    while b"healthy after" not in (line := await asyncio.wait_for(process.stderr.readline(), 60)):
        assert line, "the bench ended before its spear up was healthy"
    # (the bench may have started its raw phase's echo responder too, by the time this reads)
    children = [c for c in _children(process.pid) if b"spear\x00up\x00" in _cmdline(c)]
    assert len(children) == 1, children
    up = int(children[0])
    # Its own session, as a service: the bench's client does not share its CPU share (autogroups).
    assert os.getsid(up) == up != os.getsid(process.pid)

    others = [int(c) for c in _children(process.pid) if int(c) != up]  # (its raw phase's echo responder)
    process.send_signal(signal.SIGKILL)  # the bench ends without stopping it
    # (Python 3.11's wait() waits for every holder of the bench's stderr too: the responder held
    # it, and this test once waited for ever)
    await asyncio.wait_for(process.wait(), 30)
    for _ in range(300):  # it gets SIGTERM (its lifeline) and stops in order
        if not _running(up):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"spear up {up} outlived its bench")
    assert not [pid for pid in others if _running(pid)], others


async def test_an_echo_responder_that_cannot_start_says_why():
    """The raw NATS figures need an echo responder in a process of its own: if it cannot start,
    the bench stops with what it wrote, not with nothing (review46)."""
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RuntimeError, match=r"echo responder did not start: (?s:.*)(Connect|NoServers|refused)"):
        await _responder(nowhere, "bench.x")
