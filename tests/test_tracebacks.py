"""Where a function failed: its traceback is its result's `metrics.traceback` (probe56: a failed
execution said `RuntimeError: outer failure` and nothing kept the stack or the chained cause)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from spear.cli import components
from tests.conftest import call_body, start_spear, until_registered
from tests.own_tasks import isolated


async def _failed(running, client, body: dict) -> tuple[dict, list[str]]:
    """The failed call's result as the reply says it and the kinds of its stored events."""
    reply, _ = await running.call(client, "invoke_function", body)
    kinds = [stored.event.kind for stored in await running.service.store.history(reply["execution_id"])]
    return reply["result"], kinds


def _check(result: dict, kinds: list[str], function: str) -> None:
    assert result["status"] == "EXECUTION_STATUS_FAILED" and result["error_code"] == "FUNCTION_ERROR", result
    assert result["error_message"] == "RuntimeError: no setting missing", result
    assert kinds == ["requested", "started", "failed"], kinds  # (no event more for it)
    text = result["metrics"]["traceback"]
    assert text.startswith("Traceback (most recent call last):"), text
    assert text.count("Traceback (most recent call last):") == 2, text  # the cause's, then the error's
    assert "KeyError: 'missing'" in text and "in _read_config" in text, text  # the cause, two frames down
    assert "The above exception was the direct cause" in text and f"in {function}" in text, text
    assert text.endswith("RuntimeError: no setting missing"), text
    assert "/spear/" not in text and "concurrent/futures" not in text, text  # (spear's call of it)


async def test_a_function_that_raises_leaves_its_traceback_with_its_cause_in_its_result(served, client):
    result, kinds = await _failed(served, client, call_body("fails_with_a_cause", name="missing"))
    _check(result, kinds, "fails_with_a_cause")
    # the parameters' own failures and a function's deliberate refusals say all in their message
    result, _ = await _failed(served, client, call_body("calculate_fibonacci", task_id="demo", n=-1))
    assert result["error_code"] == "INVALID_ARGUMENT" and "traceback" not in result["metrics"], result


async def test_a_function_in_a_child_process_leaves_the_childs_traceback(settings, client):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [isolated])
        await until_registered(running, "isolated")
        body = call_body("fails_with_a_cause_in_a_process", task_id="isolated", name="missing")
        result, kinds = await _failed(running, client, body)
    _check(result, kinds, "fails_with_a_cause_in_a_process")


async def test_an_exception_that_cannot_come_back_from_its_process_still_leaves_its_traceback(settings, client):
    """probe66: one that does not pickle (of a class made in the call) or does not unpickle (its
    `__init__` takes more than it keeps) comes back as the failure that stands for it, whose
    carried traceback was dropped as spear's own failure's; spear's own kinds still have none."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [isolated])
        await until_registered(running, "isolated")
        for function, said in (("raises_its_own", "OwnError: its words"), ("raises_needs_two", "NeedsTwo: its words")):
            result, _ = await _failed(running, client, call_body(function, task_id="isolated", message="its words"))
            assert (result["error_code"], result["error_message"]) == ("FUNCTION_ERROR", said), result
            text = result["metrics"].get("traceback", "")
            assert text.startswith("Traceback (most recent call last):") and f"in {function}" in text, result
            assert text.endswith(said), text
        body = call_body("raises_a_kind_that_needs_two", task_id="isolated", kind="invalid", message="its words")
        result, _ = await _failed(running, client, body)
        assert result["error_code"] == "INVALID_ARGUMENT" and "traceback" not in result["metrics"], result


async def test_the_sdk_and_the_cli_show_where_it_failed(served, client, nats_url):
    from spear import Client, errors
    from spear.cli.output import execution_table

    async with Client([nats_url], prefix=served.settings.subject_prefix) as sdk:
        try:
            await sdk.invoke("own", "fails_with_a_cause", name="missing")
        except errors.FunctionFailed as failed:
            assert "in fails_with_a_cause" in failed.traceback and "KeyError" in failed.traceback, failed.traceback
            execution = await sdk.status(failed.execution_id)
        else:
            raise AssertionError("it did not fail")
    assert "in _read_config" in execution.traceback
    table = execution_table(execution)
    assert "\ntraceback  Traceback (most recent call last):\n" in table, table


async def test_a_traceback_hides_passwords_in_urls(served, client):
    """review59: the traceback goes to every reader with its chained causes, where the outer
    message alone did before: a driver's error with a DSN showed its password."""
    result, _ = await _failed(served, client, call_body("fails_with_a_dsn"))
    text = result["metrics"]["traceback"]
    assert "hunter2" not in text and "postgresql://app:***@db:5432/orders" in text, text


async def test_a_worker_that_says_no_slots_still_serves_its_tasks(monkeypatch):
    """review59: a worker of an older version answers without its slots (0): the task it serves
    was said to be served by none."""
    from spear.service import slots as slots_module
    from spear.service.workers import WorkerServing

    async def answers(nc, subject):
        return {"w1": WorkerServing(worker_id="w1", tasks=["demo"])}

    monkeypatch.setattr(slots_module.workers, "now_serving", answers)
    slots = slots_module.WorkerSlots(None, "spear.worker.tasks")  # type: ignore[arg-type]
    assert not slots.unserved("demo")  # (not asked yet: nothing is claimed)
    await asyncio.sleep(0.05)
    assert not slots.unserved("demo") and slots.unserved("other")
