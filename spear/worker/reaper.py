"""The reaper: one small process beside a worker that kills its users' programs if it dies.

A process artifact runs in a process group of its own, and so does an `isolation="process"`
child; the worker kills the group when the call (or the child) ends. A worker that dies at once
(SIGKILL, the OOM killer, a crash) kills nothing: `PR_SET_PDEATHSIG` reaches an artifact's own
process only, and what it started ran on, orphaned, beside the run of the redelivered invocation
on another worker (review38). So the first group a worker process starts also starts its reaper:
`/bin/sh` running REAPER_SCRIPT (a shell's start, ~2 ms and ~2 MB, not an interpreter's), in a
session of its own, with an empty environment (spear's settings are not for it) and no descriptor
of the worker's but the reading end of a pipe. The worker writes on that pipe `+ <pgid> <ticks>`
for each group it starts and `- <pgid>` once it has killed it (a few bytes, never waiting: the
pipe does not block the event loop). When the pipe ends, because the worker closed it (its last
`Worker` stopped) or died in any way, the reaper SIGKILLs every group still listed and exits: it
never outlives its worker for longer than that. Ctrl-C and a stop signal sent to the worker's
process group do not reach it (its own session), nor do they stop it (it ignores SIGHUP, SIGINT,
SIGQUIT and SIGTERM from its first line on): only the pipe's end does, after it did its job.

Process ids are reused (pid_max is 32,768 on many machines). A group id listed is dropped as soon
as the worker killed the group, and while the group has a member its id cannot be reused. The
window is the time between the group's last member ending and the worker's `-` (or the reaper's
kill, if the worker died meanwhile): long for a long-lived artifact that exited by itself, which
is forgotten when the worker next looks at it. The reaper narrows it: `<ticks>` is when the group
was listed (CLOCK_BOOTTIME in clock ticks, as /proc/<pid>/stat gives a process's start), and at
the end it spares a group whose id is then a process that started after that: the id was taken
again, and the group is not the worker's. Left: an id taken again by a process that has exited
while its group goes on, or within the same clock tick (10 ms); a group started in the
microseconds before its `+` was written (the worker killed in between); and what a program moved
out of its group (`setsid`, a daemon), which the worker kills only while the call runs (it holds
the call's output: process.py). A reaper that died (killed by hand) is started again at the next
message, and told every group still listed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time

log = logging.getLogger(__name__)

# (dash, bash, busybox: builtins only, no fork, and no file read per message; `kill -9 -N` kills
# group N. A group's start, at the end only: field 22 of /proc/N/stat, after the last ")".)
REAPER_SCRIPT = r"""# spear-reaper: kills the process groups its worker lists when the worker is gone
trap '' HUP INT QUIT TERM
set -f
listed=' '
while read -r op id at; do
  case $id in ''|0*|1|*[!0-9]*) continue ;; esac
  case $at in *[!0-9]*) at= ;; esac
  [ "$id" = "$$" ] && continue
  case $op in
  +) listed="$listed$id:$at " ;;
  -) case $listed in *" $id:"*)
       head=${listed%%" $id:"*}; rest=${listed#*" $id:"}; listed="$head ${rest#* }" ;;
     esac ;;
  esac
done
for entry in $listed; do
  id=${entry%%:*}; at=${entry#*:}; stat=
  if [ -n "$at" ] && { read -r stat; } 2>/dev/null <"/proc/$id/stat"; then
    set -- ${stat##*) }
    if [ -n "${20}" ] && [ "${20}" -gt "$at" ]; then continue; fi
  fi
  kill -9 "-$id" 2>/dev/null
done
"""
SHELL = "/bin/sh"
NAME = "spear-reaper"  # its $0: `ps` and /proc/<pid>/cmdline show it last
BACKLOG_LIMIT = 1024 * 1024  # unread by a reaper that stopped reading (a frozen one): it is replaced


class Reaper:
    """The groups this process started and has not killed yet, and the reaper that kills them
    if it dies. Thread-safe; a message costs a non-blocking write of a few bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[int, int | None] = {}  # listed (started, not yet killed): when, in ticks
        self._process: subprocess.Popen[bytes] | None = None
        self._fd = -1  # the pipe's writing end (non-blocking)
        self._backlog = bytearray()  # not written yet: the pipe was full
        self._ended: list[subprocess.Popen[bytes]] = []  # told to end, not yet reaped
        self._holders = 0  # workers running in this process
        self._unavailable = False  # no shell to run it: said once
        self._replacing = False

    @property
    def pid(self) -> int | None:
        """The reaper's process id, if it runs."""
        return self._process.pid if self._process is not None else None

    def watch(self, pgid: int) -> None:
        """Group `pgid` was started: killed by the reaper if this process dies before `forget`."""
        if pgid <= 1 or pgid == os.getpgrp():
            return
        with self._lock:
            if pgid in self._groups:
                return
            self._groups[pgid] = _ticks()
            if self._process is None:
                if not self._unavailable:
                    self._start()  # (tells it every group listed, this one too)
            else:
                self._send(_listed(pgid, self._groups[pgid]))

    def forget(self, pgid: int) -> None:
        """Group `pgid` was killed (or is not this process's to kill any more)."""
        with self._lock:
            if pgid not in self._groups:
                return
            del self._groups[pgid]
            if self._process is not None:
                self._send(b"- %d\n" % pgid)

    def taken(self, pgid: int) -> bool:
        """Whether the id of listed group `pgid` is now a process started after it was listed:
        taken again, the group's leader gone (as the reaper judges at its end: REAPER_SCRIPT)."""
        at = self._groups.get(pgid)
        if at is None:
            return False
        try:
            with open(f"/proc/{pgid}/stat", "rb") as stat:
                return int(stat.read().rsplit(b")", 1)[1].split()[19]) > at
        except (OSError, IndexError, ValueError):
            return False

    def hold(self) -> None:
        """A worker starts: the reaper (started with the first group) lasts until it lets go."""
        with self._lock:
            self._holders += 1

    def let_go(self) -> bool:
        """A worker stopped; the last one ends the reaper, which kills whatever group is still
        listed (none, after a clean stop). Whether one was ended (`wait` reaps it)."""
        with self._lock:
            self._holders = max(0, self._holders - 1)
            if self._holders or self._process is None:
                return False
            self._close()
            self._groups.clear()  # (killed by the reaper as it ends)
            return True

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` s for the reapers ended to exit, and reap them (it blocks: call
        it from a thread)."""
        with self._lock:
            ended, self._ended = self._ended, []
        for process in ended:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
            if process.returncode is None:
                with self._lock:
                    self._ended.append(process)

    # --- under the lock --------------------------------------------------------------------------

    def _start(self) -> None:
        """A new reaper, told every group listed."""
        read_end, write_end = os.pipe()  # (neither end is inherited by any other child)
        try:
            self._process = subprocess.Popen(
                [SHELL, "-c", REAPER_SCRIPT, NAME],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env={},
                start_new_session=True,
            )
        except OSError as exc:
            os.close(write_end)
            if not self._unavailable:
                self._unavailable = True
                log.warning("worker: no reaper (%s): what a program started outlives a worker that is killed", exc)
            return
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)
        self._fd = write_end
        self._backlog.clear()
        self._send(b"".join(_listed(pgid, at) for pgid, at in self._groups.items()))

    def _send(self, message: bytes) -> None:
        self._backlog += message
        while self._backlog:
            try:
                written = os.write(self._fd, self._backlog)
            except BlockingIOError:  # the reaper is behind: the rest goes with the next message
                if len(self._backlog) > BACKLOG_LIMIT:
                    log.warning("worker: the reaper stopped reading: a new one is started")
                    self._replace()
                return
            except OSError:  # it is gone (killed by hand): a new one, told every group listed
                log.warning("worker: the reaper ended: a new one is started")
                self._replace()
                return
            del self._backlog[:written]

    def _replace(self) -> None:
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.kill()  # (our child, not reaped yet: the pid is still its own)
        self._close()
        if self._groups and not self._replacing:  # (one that fails at once is not started again and again)
            self._replacing = True
            try:
                self._start()
            finally:
                self._replacing = False

    def _close(self) -> None:
        """End the pipe: the reaper kills the groups it lists and exits."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if self._process is not None and self._process.poll() is None:
            self._ended.append(self._process)
        self._process, self._fd = None, -1
        self._backlog.clear()


def _listed(pgid: int, at: int | None) -> bytes:
    return b"+ %d\n" % pgid if at is None else b"+ %d %d\n" % (pgid, at)


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)  # (Linux: what /proc/<pid>/stat counts from)
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK") if _BOOTTIME is not None else 0


def _ticks() -> int | None:
    """Now, as /proc/<pid>/stat says when a process started (None where there is no such clock)."""
    return time.clock_gettime_ns(_BOOTTIME) // _TICK_NS if _BOOTTIME is not None else None


reaper = Reaper()  # this process's: every worker in it shares it
