"""A process artifact's input on stdin (spear/worker/process.py): a process need not read it."""

from __future__ import annotations

import stat
from pathlib import Path

import uvloop

from spear.worker.context import Context
from spear.worker.process import run_process


def test_a_process_that_exits_without_reading_its_input_completes_under_uvloop(tmp_path: Path):
    """probe29: under uvloop (what `spear` runs on), writing the parameters to a process that had
    exited already raised "unable to perform operation on <WriteUnixTransport closed=True>", not
    BrokenPipeError: most such calls failed FUNCTION_ERROR although the process exited 0."""
    script = tmp_path / "no_stdin.sh"
    script.write_text("#!/bin/sh\necho 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)

    async def calls() -> list[object]:
        results = []
        for n in range(20):
            ctx = Context(execution_id=f"e{n}", task_id="t", function_name="run", attempt=1)
            parameters = {"v": "x" * (300_000 if n % 2 else 10)}  # (more than a pipe holds, or not)
            results.append(await run_process(script, "run", parameters, ctx, None, False))
        return results

    assert uvloop.run(calls()) == [1] * 20
