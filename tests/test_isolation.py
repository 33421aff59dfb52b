"""Killable isolation: functions with isolation="process" run in worker-owned child processes; a
timed-out or force-cancelled one has its process killed (and replaced), so its CPU really stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio

import spear
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import TERMINAL_STATUSES, ExecutionStatus
from tests.conftest import call_body, has_status, start_spear, until_registered
from tests.own_tasks import isolated


@pytest_asyncio.fixture
async def spear_isolated(settings):
    settings = with_overrides(settings, worker={"cancel_grace_ms": 300})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [isolated])
        await until_registered(running, "isolated")
        yield running


async def logged_pid(running, client, execution_id: str) -> int:
    for _ in range(500):
        status, _ = await running.call(
            client, "get_execution_status", {"execution_id": execution_id, "include_logs": True}
        )
        if status.get("logs"):
            return int(status["logs"][0].rsplit("pid ", 1)[1])
        await asyncio.sleep(0.01)
    raise AssertionError("the function never logged its pid")


async def gone(pid: int, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.02)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


async def test_a_cpu_bound_function_past_its_limit_times_out_and_its_process_is_killed(spear_isolated, client):
    body = {**call_body("spin", "ASYNC", task_id="isolated"), "context": {"timeout_ms": 1500, "max_retries": 0}}
    reply, _ = await spear_isolated.call(client, "invoke_function", body)
    pid = await logged_pid(spear_isolated, client, reply["execution_id"])
    assert pid != os.getpid() and alive(pid)
    for _ in range(500):
        status, _ = await spear_isolated.call(client, "get_execution_status", {"execution_id": reply["execution_id"]})
        if status["result"]["status"] in TERMINAL_STATUSES:
            break
        await asyncio.sleep(0.02)
    assert status["result"]["status"] == ExecutionStatus.TIMEOUT
    assert await gone(pid), f"process {pid} still runs after the attempt timed out"
    # a replacement serves the next call
    reply, _ = await spear_isolated.call(client, "invoke_function", call_body("spin", task_id="isolated", seconds=0.05))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED
    assert await logged_pid(spear_isolated, client, reply["execution_id"]) != pid


async def test_a_forced_cancel_kills_the_process(spear_isolated, client):
    reply, _ = await spear_isolated.call(client, "invoke_function", call_body("spin", "ASYNC", task_id="isolated"))
    pid = await logged_pid(spear_isolated, client, reply["execution_id"])
    cancel, _ = await spear_isolated.call(
        client, "cancel_execution", {"execution_id": reply["execution_id"], "force": True}
    )
    assert cancel["final_status"] == ExecutionStatus.CANCELLED
    assert await gone(pid)


async def test_a_functions_process_holds_not_the_workers_spear_settings(settings, client, monkeypatch):
    """probe57: what a user's code runs in gets the worker's environment but for its `SPEAR_*`
    settings, which hold its NATS login."""
    monkeypatch.setenv("SPEAR_NATS__PASSWORD", "the-workers-secret")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [isolated])
        await until_registered(running, "isolated")
        reply, _ = await running.call(client, "invoke_function", call_body("spear_variables", task_id="isolated"))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED and reply["result"]["result"] == [], reply


async def test_streams_progress_and_errors_come_back_from_the_process(spear_isolated, client):
    reply, _ = await spear_isolated.call(client, "invoke_function", call_body("in_a_process", task_id="isolated", n=3))
    result = reply["result"]
    assert result["status"] == ExecutionStatus.COMPLETED, result
    assert [item["i"] for item in result["result"]] == [0, 1, 2] and result["result"][0]["pid"] != os.getpid()
    history = [event for event, _ in await spear_isolated.service.store.history(reply["execution_id"])]
    assert [e.data["i"] for e in history if e.kind == "chunk"] == [0, 1, 2]
    assert [e.progress for e in history if e.kind == "log"][-1] == 1.0
    reply, _ = await spear_isolated.call(
        client, "invoke_function", call_body("fails_in_a_process", task_id="isolated", message="nope")
    )
    assert reply["result"]["error_message"] == "NonRetryableError: nope"  # the same as in a thread
    reply, _ = await spear_isolated.call(
        client, "invoke_function", call_body("raises_its_own", task_id="isolated", message="its own words")
    )
    result = reply["result"]  # (probe28: only "the outcome cannot be sent back" came, not what it said)
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), result
    assert result["error_message"] == "OwnError: its own words", result  # as in a thread (probe41)
    reply, _ = await spear_isolated.call(  # (review22: one that pickles and does not unpickle)
        client, "invoke_function", call_body("raises_needs_two", task_id="isolated", message="two words")
    )
    result = reply["result"]
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), result
    assert result["error_message"] == "NeedsTwo: two words", result
    for kind, status, code in (  # (review43: spear's own kinds came back as FUNCTION_ERROR, retried)
        ("invalid", ExecutionStatus.FAILED, "INVALID_ARGUMENT"),
        ("stops", ExecutionStatus.CANCELLED, "CANCELLED"),
    ):
        body = call_body("raises_a_kind_that_needs_two", task_id="isolated", kind=kind, message="its words")
        reply, _ = await spear_isolated.call(client, "invoke_function", body)
        result = reply["result"]
        assert (result["status"], result["error_code"], result["error_message"]) == (status, code, "its words"), result
        assert result["attempt"] == 1, result  # not retried
    for what in ("deep", "function"):  # (probe29: FUNCTION_ERROR, where a thread's is RESULT_NOT_SERIALIZABLE)
        reply, _ = await spear_isolated.call(
            client, "invoke_function", call_body("returns_what_cannot_be_sent", task_id="isolated", what=what)
        )
        result = reply["result"]
        assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "RESULT_NOT_SERIALIZABLE"), result


async def test_an_exception_with_no_message_from_a_process_is_said_by_its_type_alone(spear_isolated, client):
    """probe66: "NonRetryableError:" with a trailing colon, as in a thread (test_functions); sent
    back as it is, or as the text of one that does not pickle."""
    for function, said in (("fails_in_a_process", "NonRetryableError"), ("raises_its_own", "OwnError")):
        reply, _ = await spear_isolated.call(
            client, "invoke_function", call_body(function, task_id="isolated", message="")
        )
        result = reply["result"]
        assert (result["error_code"], result["error_message"]) == ("FUNCTION_ERROR", said), result


def test_process_isolation_needs_a_module_level_plain_function():
    task = spear.Task("checks")
    with pytest.raises(spear.TaskDefinitionError, match="module-level function"):

        @task.function(isolation="process")
        def nested() -> int:
            return 1


async def test_a_cooperative_cancel_reaches_the_process_which_is_kept(spear_isolated, client):
    reply, _ = await spear_isolated.call(client, "invoke_function", call_body("patient", "ASYNC", task_id="isolated"))
    pid = await logged_pid(spear_isolated, client, reply["execution_id"])
    cancel, _ = await spear_isolated.call(client, "cancel_execution", {"execution_id": reply["execution_id"]})
    assert cancel["final_status"] == ExecutionStatus.CANCELLED
    assert alive(pid)  # stopped by itself: its process serves the next call
    reply, _ = await spear_isolated.call(client, "invoke_function", call_body("spin", task_id="isolated", seconds=0))
    assert await logged_pid(spear_isolated, client, reply["execution_id"]) == pid


async def test_the_worker_default_isolation_applies_to_plain_functions(settings, client):
    from tests.own_tasks import own

    settings = with_overrides(settings, worker={"isolation": "process"})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [own])
        await until_registered(running, "own")
        reply, _ = await running.call(client, "invoke_function", call_body("about", note="n"))
        assert reply["result"]["status"] == ExecutionStatus.COMPLETED, reply
        assert reply["result"]["result"]["pid"] != os.getpid()
        assert reply["result"]["result"]["execution_id"] == reply["execution_id"]
        reply, _ = await running.call(client, "invoke_function", call_body("slow", ms=1))  # async: on the loop
        assert reply["result"]["result"] == 1


@pytest.mark.parametrize(
    "how, raised", [("interrupt", "KeyboardInterrupt"), ("exit", "SystemExit"), ("cancel", "CancelledError")]
)
async def test_keyboard_interrupt_or_system_exit_in_the_child_fails_the_execution_not_the_worker(
    spear_isolated, client, how, raised
):
    body = call_body("exits_in_a_process", task_id="isolated", how=how)
    reply, _ = await spear_isolated.call(client, "invoke_function", body)
    result = reply["result"]
    assert (result["status"], result["error_code"], result["error_message"]) == (
        ExecutionStatus.FAILED,
        "FUNCTION_ERROR",
        f"{raised}: {how}",
    ), reply
    again, _ = await spear_isolated.call(client, "invoke_function", call_body("in_a_process", task_id="isolated", n=1))
    assert again["result"]["status"] == ExecutionStatus.COMPLETED, again  # the worker and its children serve on


@pytest.mark.parametrize("worker_stops", [True, False], ids=["with_its_worker", "alone"])
async def test_a_function_process_ended_by_a_stop_signal_with_its_worker_is_handed_back(
    spear_isolated, client, worker_stops
):
    """probe45: systemd stops a unit by signalling its whole cgroup at once: the function's
    process died of that SIGTERM, and the attempt ended FAILED, its retries used, where a thread's
    attempt was handed back (`released`). Ended so while its worker stops, it is a stop; alone
    (someone killed just that process), it is the function's failure, as before."""
    body = {**call_body("spin", "ASYNC", task_id="isolated"), "context": {"max_retries": 0}}
    reply, _ = await spear_isolated.call(client, "invoke_function", body)
    execution_id = reply["execution_id"]
    pid = await logged_pid(spear_isolated, client, execution_id)
    os.kill(pid, signal.SIGTERM)
    assert spear_isolated.worker is not None
    if worker_stops:
        await spear_isolated.worker.stop(grace_s=5)
        kinds = [s.event.kind for s in await spear_isolated.service.store.history(execution_id)]
        assert kinds == ["requested", "started", "log", "released"], kinds  # not used up: it runs again elsewhere
    else:
        status, _ = await spear_isolated.status_until(client, execution_id, has_status(*TERMINAL_STATUSES))
        assert status["result"]["status"] == ExecutionStatus.FAILED, status
        assert "exited with code -15" in status["result"]["error_message"], status


async def test_an_idle_child_that_died_is_passed_over(spear_isolated, client):
    """review46: a stop signal sent to every process at once also ends the idle children; the
    next call was handed a dead one and failed ("BrokenPipeError"), its retry used."""
    reply, _ = await spear_isolated.call(client, "invoke_function", call_body("spin", task_id="isolated", seconds=0.01))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED, reply
    pid = await logged_pid(spear_isolated, client, reply["execution_id"])
    os.kill(pid, signal.SIGTERM)  # it waits, idle, for the next call
    await asyncio.sleep(0.3)  # (dead; a zombie until its worker looks)
    body = {**call_body("spin", task_id="isolated", seconds=0.01), "context": {"max_retries": 0}}
    reply, _ = await spear_isolated.call(client, "invoke_function", body)
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED, reply
    assert await logged_pid(spear_isolated, client, reply["execution_id"]) != pid


async def test_what_a_functions_process_started_dies_with_it_at_its_time_limit(spear_isolated, client, tmp_path):
    """A child process runs in a process group of its own, killed whole: a program a timed-out
    function started (a `subprocess` of its own) ran on after its process was killed."""
    from tests.processes import gone_within, read_pids

    path = tmp_path / "pids"
    body = {
        **call_body("starts_a_program", "ASYNC", task_id="isolated", path=str(path)),
        "context": {"timeout_ms": 3000, "max_retries": 0},
    }
    reply, _ = await spear_isolated.call(client, "invoke_function", body)
    child, program = await read_pids(path)
    status, _ = await spear_isolated.status_until(client, reply["execution_id"], has_status(*TERMINAL_STATUSES))
    assert status["result"]["status"] == ExecutionStatus.TIMEOUT, status
    assert await gone_within([child, program], 5) == [], "what the function started outlived its process"


@pytest.mark.slow  # real processes: a `spear worker`, killed
async def test_what_a_functions_process_started_dies_with_its_worker(settings, client, tmp_path):
    """A child exits when its worker's pipe ends, but what it started ran on, orphaned, after the
    worker was killed with SIGKILL (and a child busy in native code would not see the pipe end):
    the worker's reaper kills the child's process group."""
    from tests.processes import PROCESS_START_S, gone_within, read_pids, spawn_worker

    path = tmp_path / "pids"
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await spawn_worker(
            stack, settings.nats.urls[0], running.names.prefix, tmp_path / "w.log", ("tests.own_tasks:isolated",)
        )
        await until_registered(running, "isolated", PROCESS_START_S)
        body = call_body("starts_a_program", "ASYNC", task_id="isolated", path=str(path))
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"], reply
        child, program = await read_pids(path)
        worker.kill()
        with contextlib.suppress(TimeoutError):  # (a program left running holds the worker's stdout)
            await asyncio.wait_for(worker.wait(), 5)
        assert await gone_within([child, program], 5) == [], "what the function started outlived its worker"
