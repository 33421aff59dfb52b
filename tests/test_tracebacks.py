"""Where a function failed: its traceback is a line of its attempt's logs (probe56: a failed
execution said `RuntimeError: outer failure` and nothing kept the stack or the chained cause)."""

from __future__ import annotations

from contextlib import AsyncExitStack

from spear.cli import components
from tests.conftest import call_body, start_spear, until_registered
from tests.own_tasks import isolated


async def _logs(running, client, body: dict) -> tuple[dict, list[str]]:
    reply, _ = await running.call(client, "invoke_function", body)
    asked = {"execution_id": reply["execution_id"], "include_logs": True}
    status, _ = await running.call(client, "get_execution_status", asked)
    return reply["result"], [line if isinstance(line, str) else line["message"] for line in status["logs"]]


def _check(result: dict, logs: list[str], function: str) -> None:
    assert result["status"] == "EXECUTION_STATUS_FAILED" and result["error_code"] == "FUNCTION_ERROR", result
    assert result["error_message"] == "RuntimeError: no setting missing", result
    told = [line for line in logs if "Traceback (most recent call last):" in line]
    assert len(told) == 1, logs  # one line, once
    text = told[0]
    assert text.count("Traceback (most recent call last):") == 2, text  # the cause's, then the error's
    assert "KeyError: 'missing'" in text and "in _read_config" in text, text  # the cause, two frames down
    assert "The above exception was the direct cause" in text and f"in {function}" in text, text
    assert text.rstrip().endswith("RuntimeError: no setting missing"), text
    assert "/spear/worker/" not in text, text  # (spear's call of the function is not the developer's)


async def test_a_function_that_raises_leaves_its_traceback_with_its_cause_in_the_logs(served, client):
    result, logs = await _logs(served, client, call_body("fails_with_a_cause", name="missing"))
    _check(result, logs, "fails_with_a_cause")
    # the parameters' own failures and a function's deliberate refusals say all in their message
    result, logs = await _logs(served, client, call_body("calculate_fibonacci", task_id="demo", n=-1))
    assert result["error_code"] == "INVALID_ARGUMENT" and not any("Traceback" in line for line in logs), logs


async def test_a_function_in_a_child_process_leaves_the_childs_traceback_once(settings, client):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [isolated])
        await until_registered(running, "isolated")
        body = call_body("fails_with_a_cause_in_a_process", task_id="isolated", name="missing")
        result, logs = await _logs(running, client, body)
    _check(result, logs, "fails_with_a_cause_in_a_process")
