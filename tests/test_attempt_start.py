"""An attempt cancelled (or handed back) while its `started` was being stored never starts its
function: the cancel came when there was no task to stop yet, and the function ran all the same,
a forced cancel included (review15)."""

import time

from spear.core.enums import ErrorCode, ExecutionStatus
from spear.worker.attempt import Running, run_attempt
from spear.worker.context import Context
from spear.worker.tasks import Task

ran: list[str] = []
task = Task("t")


@task.function
async def records(note: str) -> str:
    ran.append(note)
    return note


async def test_an_attempt_cancelled_before_its_function_starts_never_runs_it():
    for force in (False, True):
        ctx = Context("e", "t", "records", 1, deadline=time.time() + 5)
        running = Running(ctx, task.functions["records"])
        running.cancel(force=force)  # as the cancel listener does, while `started` is being stored
        outcome = await run_attempt(
            task.functions["records"], {"note": "x"}, running, 5000, "2026-01-01T00:00:00.000Z", None, 1 << 20
        )
        assert (outcome.result.status, outcome.result.error_code) == (ExecutionStatus.CANCELLED, ErrorCode.CANCELLED)
        assert outcome.result.error_message == "cancelled before it started"
    assert ran == []
    ctx = Context("e", "t", "records", 1, deadline=time.time() + 5)
    outcome = await run_attempt(
        task.functions["records"], {"note": "y"}, Running(ctx, task.functions["records"]), 5000, "", None, 1 << 20
    )
    assert outcome.result.result == "y" and ran == ["y"]
