"""The worker's reaper (spear/worker/reaper.py), with real processes: the groups it lists are
killed when its pipe ends, those forgotten are not, it outlasts stop signals and its own death,
and it spares a group whose id another process took."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spear.aio import poll_until
from spear.worker.reaper import NAME, REAPER_SCRIPT, SHELL, Reaper
from tests.processes import gone_within, group_members, running


@pytest.fixture
def groups() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Process groups of three processes each (a shell, its `sleep &` and its `sleep`), as a
    process artifact runs; whatever is left of them is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def start_group(groups: list[subprocess.Popen[bytes]]) -> list[int]:
    """A new group, as `groups` holds; its members, once all three run."""
    command = ["/bin/sh", "-c", "sleep 300 & sleep 300; :"]
    process = await asyncio.to_thread(subprocess.Popen, command, start_new_session=True)
    groups.append(process)
    members = await poll_until(
        lambda: asyncio.to_thread(group_members, process.pid), lambda found: len(found) == 3, timeout_s=10
    )
    return sorted(members)


def ignored(pid: int) -> set[int]:
    """The signals process `pid` ignores."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 65) if mask & (1 << (number - 1))}
    return set()


def ended(reaper: Reaper) -> None:
    """The last worker lets go: the reaper's pipe ends, and it exits."""
    assert reaper.let_go()
    reaper.wait(5)


async def test_the_groups_still_listed_are_killed_when_its_pipe_ends_and_only_those(groups):
    reaper = Reaper()
    first, second, third = [await start_group(groups) for _ in range(3)]
    for members in (first, second, third):
        reaper.watch(members[0])
    reaper.forget(second[0])  # (killed by the worker, say: not the reaper's any more)
    pid = reaper.pid
    assert pid is not None and os.getsid(pid) == pid  # a session of its own: no Ctrl-C reaches it
    assert await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes) == b""  # none of spear's settings
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
    await poll_until(lambda: asyncio.to_thread(ignored, pid), lambda found: stops <= found, timeout_s=5)
    for sig in stops:  # sent to it all the same
        os.kill(pid, sig)
    reaper.hold()
    reaper.hold()
    assert not reaper.let_go()  # another worker of the process still runs
    await asyncio.sleep(0.2)
    assert running(pid) and all(map(running, first + second + third))
    ended(reaper)
    assert not running(pid)
    assert await gone_within(first + third, 5) == []
    assert all(map(running, second))


async def test_a_reaper_that_died_is_replaced_and_told_every_group_listed(groups):
    reaper = Reaper()
    first, second = await start_group(groups), await start_group(groups)
    reaper.watch(first[0])
    killed = reaper.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)  # by hand, say
    await poll_until(lambda: asyncio.sleep(0, running(killed)), lambda alive: not alive, timeout_s=5)
    reaper.watch(second[0])  # the next message finds it gone
    assert reaper.pid not in (None, killed)
    ended(reaper)
    assert await gone_within(first + second, 5) == []


async def test_a_group_whose_id_another_process_took_is_spared(groups):
    """A listed group id is the leader's pid: once the group is gone the id can be taken by a new
    process (pid_max is 32,768 on many machines). The worker says when it listed the group, and
    the reaper spares a group whose id is then a process that started after that."""
    ours, taken = await start_group(groups), await start_group(groups)
    stat = await asyncio.to_thread(Path(f"/proc/{taken[0]}/stat").read_text)
    taken_at = int(stat.rsplit(")", 1)[1].split()[19])  # (in clock ticks since boot)
    # `taken` as if listed before its process started (its id another group's then); `ours` now
    messages = f"+ {ours[0]} {taken_at}\n+ {taken[0]} {taken_at - 1}\n".encode()
    done = await asyncio.to_thread(subprocess.run, [SHELL, "-c", REAPER_SCRIPT, NAME], input=messages, timeout=10)
    assert done.returncode == 0
    assert await gone_within(ours, 5) == []
    assert all(map(running, taken))


async def test_the_worker_judges_a_group_it_is_about_to_kill_as_the_reaper_would(groups):
    """A long-lived instance found dead at its next call (or retired idle) had its group killed by
    its worker then: by its id, which another process may have taken since the instance exited."""
    reaper = Reaper()
    members = await start_group(groups)
    reaper.watch(members[0])
    assert not reaper.taken(members[0])  # its own leader still has the id
    reaper._groups[members[0]] -= 1000  # as if listed 10 s before its leader started: taken since
    assert reaper.taken(members[0])
    assert not reaper.taken(1)  # (not listed: the worker kills as it did)
    reaper.forget(members[0])
    ended(reaper)
    assert all(map(running, members))
