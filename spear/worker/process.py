"""Process artifacts (CONTRACT §8): one process per call.

The executable gets the function name as its first argument and the parameters as one JSON object
on stdin. stdout is the result as one JSON value, or, in STREAM mode, one chunk per line (JSON when
the line parses, else the line as a string). stderr lines become the execution's `log` events;
a non-zero exit fails the call with the tail of stderr as its message. The process runs in its own
process group, which is killed when the call ends in any way (timeout and cancel included), so
nothing it started outlives the call; the call ends when the process exits, and a process it
started in a session of its own that still holds its stdout or stderr then is killed too. A worker
that dies at once kills nothing itself: its reaper kills the groups then (reaper.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections import deque
from pathlib import Path
from typing import Any

from spear.environment import for_programs
from spear.orphans import die_with_parent
from spear.worker.context import Context, ReportedFailure, StreamedItems
from spear.worker.inprocess import ChunkSink
from spear.worker.reaper import reaper
from spear.worker.sealed import SealedProgram, artifact_variables

STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2000
LINE_LIMIT = 16 * 1024 * 1024  # the longest stdout line (one chunk) read
STDOUT_RESULTS = 2  # the most stdout kept, in results' size (JSON written loosely may shrink)
EXIT_DRAIN_S = 0.5  # after the process exits, how long its output may take to end
EXIT_POLL_S = 0.05  # while its output goes on, how often whether the process exited is looked at


async def _send_input(stdin: asyncio.StreamWriter, parameters: dict[str, Any]) -> None:
    """The parameters on the process's stdin, as one JSON object; it need not read them."""
    try:
        stdin.write(json.dumps(parameters).encode())
        await stdin.drain()
        stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except RuntimeError:  # uvloop's word for a pipe the process closed by exiting (probe29)
        if not stdin.is_closing():
            raise


async def run_process(
    path: Path,
    function_name: str,
    parameters: dict[str, Any],
    ctx: Context,
    sink: ChunkSink | None,
    stream: bool,
    program: SealedProgram | None = None,
) -> Any:
    """Run one call of a process artifact's function in a new process; its result. `program`:
    the verified copy of the file at `path` to run (sealed.py), else the file itself."""
    env = for_programs(
        SPEAR_EXECUTION_ID=ctx.execution_id,
        SPEAR_TASK_ID=ctx.task_id,
        SPEAR_FUNCTION_NAME=function_name,
        SPEAR_ATTEMPT=str(ctx.attempt),
        **artifact_variables(path),
    )
    process = await asyncio.create_subprocess_exec(
        program.path if program is not None else str(path),
        function_name,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=path.parent,
        env=env,
        pass_fds=(program.fd,) if program is not None else (),
        start_new_session=True,  # its own process group: killed whole
        # Dies with the worker (SIGKILL too): the redelivered invocation runs it again elsewhere.
        preexec_fn=die_with_parent(signal.SIGKILL),  # only a prctl call
        limit=LINE_LIMIT,
    )
    reaper.watch(process.pid)  # what it starts dies with the worker too (reaper.py)
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    output = Output()
    try:
        assert process.stdin and process.stdout and process.stderr
        await _send_input(process.stdin, parameters)
        readers = {
            asyncio.ensure_future(_stdout(process.stdout, sink, stream, output)),
            asyncio.ensure_future(_stderr(process.stderr, ctx, tail)),
        }
        try:
            # Until the output ends, or the process exits with something it started holding the
            # output (asyncio's `wait()` would wait for that too: it returns once every pipe is
            # closed). A reader that fails (a chunk refused) ends the call at once.
            pending = set(readers)
            while pending and process.returncode is None:
                done, pending = await asyncio.wait(pending, timeout=EXIT_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                for reader in done:
                    reader.result()
            if pending:
                await _drained(pending, _pipe_inodes(process))
                for reader in readers:
                    if reader.done():
                        reader.result()
            code = process.returncode if process.returncode is not None else await process.wait()
        finally:
            if not all(reader.done() for reader in readers):  # cut short (time limit, cancel, a failure):
                _kill_writers(_pipe_inodes(process))  # what it started in a session of its own too
            for reader in readers:
                reader.cancel()
    finally:
        _kill_group(process)
        if process.returncode is None:
            await process.wait()
    if code != 0:
        text = "\n".join(tail)[-STDERR_TAIL_CHARS:]
        raise ReportedFailure(text or f"{path.name} {function_name} exited with code {code}", exit_code=code)
    return output.items if stream else output.value()


class Output:
    """What a call's stdout said so far: kept as it comes, so that a call whose output never ends
    (something it started holds the pipe) still has what it wrote."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.items = StreamedItems()  # STREAM mode: one per line

    def value(self) -> Any:
        """The one JSON value stdout holds (None if it is empty)."""
        text = self.data.decode(errors="replace").strip()
        if not text:
            return None
        try:
            return json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # (nested past the stack: not retried either, probe57)
            raise ReportedFailure(f"stdout is not one JSON value: {text[:200]!r}", retryable=False) from None


async def _stdout(reader: asyncio.StreamReader, sink: ChunkSink | None, stream: bool, output: Output) -> None:
    if not stream:
        # More than a result can carry fails the call at once: kept whole, an endless writer grew
        # the worker past a gigabyte (probe57: 300 MB of output, 988 MB of RSS)
        most = STDOUT_RESULTS * StreamedItems.limit
        while chunk := await reader.read(65536):
            output.data += chunk
            if len(output.data) > most:
                raise ReportedFailure(
                    f"ResultTooLarge: stdout passed {most} bytes, more than a result can carry"
                    f" ({StreamedItems.limit} bytes as JSON)",
                    retryable=False,
                )
        return
    async for raw in reader:
        line = raw.decode(errors="replace").rstrip("\r\n")  # an empty line is a chunk too: "" (probe50)
        try:
            item = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # not JSON (NaN, Infinity, nested past the stack): the line
            item = line
        if sink is not None:
            await sink.chunk(item)
        output.items.keep(item)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _drained(readers: set[asyncio.Task[None]], inodes: set[int]) -> None:
    """Wait for stdout and stderr to end after the process exited. A process it started that
    holds them (a daemon in a session of its own, out of reach of the group kill) would keep the
    call waiting until its time limit (probe19: exit 0, ended TIMEOUT, the daemon left alive):
    after EXIT_DRAIN_S whatever still holds their writing ends is killed. The readers then read
    to the end of what was written, however long that takes (review15: cut short, a STREAM of
    60,000 lines stored 13,000 of them); the attempt's time limit bounds it."""
    _, pending = await asyncio.wait(readers, timeout=EXIT_DRAIN_S)
    if pending:
        _kill_writers(inodes)
        await asyncio.wait(pending)


def _pipe_inodes(process: asyncio.subprocess.Process) -> set[int]:
    """The inodes of the call's stdout and stderr pipes (a pipe's two ends share one)."""
    inodes = set()
    for reader in (process.stdout, process.stderr):
        transport = getattr(reader, "_transport", None)
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        if pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                inodes.add(os.fstat(pipe.fileno()).st_ino)
    return inodes


def _kill_writers(inodes: set[int]) -> None:
    for pid in _writers(inodes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _writers(inodes: set[int]) -> set[int]:
    """The processes (this user's: /proc shows no other's descriptors) holding the writing end of
    one of the pipes `inodes`: what the call started and left behind, not a process that holds
    a reading end (a fork of this one, say)."""
    wanted = {f"pipe:[{inode}]" for inode in inodes}
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(fd) in wanted and _writes(entry / "fdinfo" / fd.name):
                        found.add(int(entry.name))
                        break
    return found


def _writes(fdinfo: Path) -> bool:
    """Whether the descriptor /proc/<pid>/fdinfo/<fd> describes is open for writing only (a
    pipe's writing end; its `flags` are octal)."""
    for line in fdinfo.read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8) & os.O_ACCMODE == os.O_WRONLY
    return False


async def _stderr(reader: asyncio.StreamReader, ctx: Context, tail: deque[str]) -> None:
    async for raw in reader:
        line = raw.decode(errors="replace").rstrip("\r\n")
        tail.append(line)
        ctx.log(line)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    reaper.forget(process.pid)  # (killed: no longer the reaper's to kill)


class _Answered(ReportedFailure):
    """The function failed, as the long-lived process answered (`{"error": …}`): the process
    itself is fine and serves the next call (it was killed, and a new one started, every time)."""


class ServingProcess:
    """A process artifact that declares `metadata.long_lived = "true"`: one process per task
    instance, started with the argument `serve`, given one call at a time. A call is one JSON line
    on its stdin, `{"function": …, "parameters": {…}, "execution_id": …, "stream": bool}`; it
    answers with JSON lines on stdout: any number of `{"chunk": …}` (chunks in STREAM mode), then
    `{"result": …}` or `{"error": "message"}`. stderr lines are the current call's logs. A call
    that times out or is cancelled kills the process group: the instance is gone, the next call
    starts another."""

    def __init__(self, path: Path, program: SealedProgram | None = None):
        self.path = path
        self.program = program  # the verified copy of the file to run (sealed.py), else the file
        self.process: asyncio.subprocess.Process | None = None
        self.ctx: Context | None = None  # the call being served: where stderr lines go
        self._lock = asyncio.Lock()
        self._stderr: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    @property
    def alive(self) -> bool:
        """Whether the long-lived process is running."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the long-lived process."""
        self.process = await asyncio.create_subprocess_exec(
            self.program.path if self.program is not None else str(self.path),
            "serve",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.path.parent,
            env=for_programs(**artifact_variables(self.path)),
            pass_fds=(self.program.fd,) if self.program is not None else (),
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),  # (as run_process's)
            limit=LINE_LIMIT,
        )
        reaper.watch(self.process.pid)
        self._stderr = asyncio.get_running_loop().create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.process and self.process.stderr
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self._tail.append(line)
            if self.ctx is not None:
                self.ctx.log(line)

    async def call(
        self, function_name: str, parameters: dict[str, Any], ctx: Context, sink: ChunkSink | None, stream: bool
    ) -> Any:
        """One call of a function in the long-lived process (calls take turns); its result."""
        async with self._lock:
            if not self.alive:
                raise await self._not_running()
            assert self.process and self.process.stdin and self.process.stdout
            self.ctx = ctx
            try:
                request = {"function": function_name, "parameters": parameters, "stream": stream}
                request["execution_id"] = ctx.execution_id
                self.process.stdin.write(json.dumps(request).encode() + b"\n")
                await self.process.stdin.drain()
                answer = await self._answer(self.process.stdout, sink, stream)
                self._tail.clear()  # (only once answered: a process that died at its start said why there)
                return answer
            except _Answered:
                self._tail.clear()
                raise  # a clean `{"error": …}`: the process is ready for the next call
            except OSError:  # it ended as the call was written (a broken pipe): say why
                self.stop()
                raise await self._not_running() from None
            except (asyncio.CancelledError, ReportedFailure):
                self.stop()  # a call cut short leaves the process in an unknown state
                raise
            finally:
                self.ctx = None

    async def _answer(self, stdout: asyncio.StreamReader, sink: ChunkSink | None, stream: bool) -> Any:
        items = StreamedItems()
        while True:
            raw = await stdout.readline()
            if not raw:
                raise await self._not_running()
            try:
                message = json.loads(raw)
            except (ValueError, RecursionError):
                raise ReportedFailure(f"not a JSON line on stdout: {raw[:200]!r}", retryable=False) from None
            if not isinstance(message, dict):
                raise ReportedFailure(f"expected an object per line, got {raw[:200]!r}", retryable=False)
            if "chunk" in message:
                if stream:
                    if sink is not None:
                        await sink.chunk(message["chunk"])
                    items.keep(message["chunk"])
            elif "error" in message:
                raise _Answered(str(message["error"]))
            elif "result" in message:
                return items if stream and message["result"] is None else message["result"]

    async def _not_running(self) -> ReportedFailure:
        """The failure of a call whose long-lived process is gone, with its exit code."""
        said = await self._why_not_running()
        return ReportedFailure(said, exit_code=self.process.returncode if self.process is not None else None)

    async def _why_not_running(self) -> str:
        """What to say of a long-lived process that is gone: its exit and the tail of its stderr
        (CONTRACT §8; a probe's process that failed at start said only "not running")."""
        if self.process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 1.0)  # (it closed its stdout: it is ending)
        if self._stderr is not None:
            await asyncio.wait({self._stderr}, timeout=1.0)  # what it wrote before it ended
        code = self.process.returncode if self.process is not None else None
        said = f"the long-lived process of {self.path.name} is not running"
        if code is not None:
            said += f" (it exited with code {code})"
        tail = "\n".join(self._tail)[-STDERR_TAIL_CHARS:]
        return f"{said}: {tail}" if tail else said

    def stop(self) -> None:
        """Kill the process group (idle retirement, a new instance, a call cut short, shutdown)."""
        if self.process is not None:
            # One that exited long ago (found dead at the next call, or retired idle) may have
            # left no member in its group, whose id another process may have taken since
            if self.process.returncode is None or not reaper.taken(self.process.pid):
                _kill_group(self.process)
            reaper.forget(self.process.pid)
        if self._stderr is not None:
            self._stderr.cancel()
