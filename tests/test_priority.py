"""`spear up` gives the processes it starts their components' `nice` (spear/cli/priority.py):
the process's priority, and its session's autogroup where the kernel schedules by autogroup."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spear.cli import priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def nice_of(pid: int) -> int:
    """The process's nice value, as the kernel reports it (/proc/<pid>/stat, field 19)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def autogroup_nice_of(pid: int) -> int | None:
    """The nice value of the process's autogroup ("/autogroup-N nice K"), None without autogroups.

    A process in the kernel's default autogroup (one whose session descends from PID 1's without
    a setsid, as in some containers) reads as empty: 0, as spear's priority.py reads it too.
    """
    path = Path(f"/proc/{pid}/autogroup")
    if not path.exists():
        return None
    fields = path.read_text().split()
    return int(fields[-1]) if fields else 0


async def _sleeper() -> asyncio.subprocess.Process:
    # In a session of its own, as spear up starts its children: its autogroup is its own.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(30)", start_new_session=True
    )


async def test_a_child_gets_the_nice_value_added_and_so_does_its_autogroup():
    child = await _sleeper()
    try:
        await priority.lower(child.pid, 7)
        assert nice_of(child.pid) == min(19, nice_of(os.getpid()) + 7)
        ours = autogroup_nice_of(os.getpid())
        assert autogroup_nice_of(child.pid) == (None if ours is None else min(19, ours + 7))
    finally:
        child.kill()
        await child.wait()


LOWER_MANY = """
import asyncio, os, sys
from spear.cli import priority

async def main():
    os.setgid(65534)
    os.setuid(65534)  # not root: the kernel takes one autogroup change per 100 ms
    # (spear was imported before, as root: nobody may not read it, nor run this Python)
    children = [await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True) for _ in range(7)]
    await asyncio.gather(*(priority.lower(child.pid, 10) for child in children))
    for child in children:
        print(open(f"/proc/{child.pid}/autogroup").read().split()[-1])
        child.kill()
        await child.wait()

asyncio.run(main())
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/proc/self/autogroup").exists(), reason="needs root to become nobody"
)
def test_children_started_together_by_a_user_that_is_not_root_all_get_their_autogroup_lowered():
    ran = subprocess.run([sys.executable, "-c", LOWER_MANY], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    ours = autogroup_nice_of(os.getpid()) or 0
    assert ran.stdout.split() == [str(min(19, ours + 10))] * 7


async def test_nice_0_leaves_the_child_as_it_is():
    child = await _sleeper()
    try:
        before = (nice_of(child.pid), autogroup_nice_of(child.pid))
        await priority.lower(child.pid, 0)
        assert (nice_of(child.pid), autogroup_nice_of(child.pid)) == before
    finally:
        child.kill()
        await child.wait()


async def test_a_child_already_gone_is_no_error():
    child = await _sleeper()
    child.kill()
    await child.wait()
    await priority.lower(child.pid, 5)  # logged, not raised


def test_children_of_spear_up_run_at_their_components_nice(tmp_path):
    """Wired through: spear up's workers and projection at their settings' nice, NATS and the
    gateway (spear up) as started."""
    from tests.processes import free_port

    env = {**os.environ, "SPEAR_WORKER__NICE": "9", "SPEAR_PROJECTION__NICE": "4"}
    command = [sys.executable, "-m", "spear", "up", "--data-dir", str(tmp_path), "--nats-port", "-1"]
    up = subprocess.Popen(
        [*command, "--http-port", str(free_port()), "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert up.stdout is not None and up.stdout.readline().startswith(b"spear is up")
        children = [int(pid) for pid in Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split()]
        kinds = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children}
        workers = [pid for pid, argv in kinds.items() if b"worker" in argv]
        projections = [pid for pid, argv in kinds.items() if b"projection" in argv]
        servers = [pid for pid, argv in kinds.items() if argv[0].endswith(b"nats-server")]
        assert len(workers) == 2 and len(projections) == 1 and len(servers) == 1, kinds
        ours = nice_of(up.pid)
        assert ours == nice_of(os.getpid()) == nice_of(servers[0])  # spear up and NATS as started
        assert [nice_of(pid) for pid in workers] == [min(19, ours + 9)] * 2
        assert nice_of(projections[0]) == min(19, ours + 4)
        group = autogroup_nice_of(up.pid)
        if group is not None:
            assert [autogroup_nice_of(pid) for pid in workers] == [min(19, group + 9)] * 2
            assert autogroup_nice_of(projections[0]) == min(19, group + 4)
            assert autogroup_nice_of(servers[0]) == 0
    finally:
        up.terminate()
        assert up.wait(30) == 0
