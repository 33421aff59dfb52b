"""Poison: bytes no reader can use, stored on the log behind the gateway's back, and invocations
that cannot be processed. Each ends visibly (FAILED, POISON_MESSAGE, one terminal event) and
nothing else stops: not the worker, not the projection, not status, not health."""

import asyncio
import time
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio

from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import ExecutionStatus
from spear.core.events import TERMINAL_KINDS
from spear.projection.projection import rebuild
from spear.worker.tasks import Task
from tests.conftest import has_status, invoke_body, publish_raw, start_spear

REQUESTED = (
    b'{"type":"requested","execution_id":"%s","task_id":"demo","function_name":"echo","at":"x",'
    b'"execution_mode":"EXECUTION_MODE_ASYNC","parameters":{"value":%s}}'
)

POISON = {
    "invalid-utf8": REQUESTED % (b"%s", b'"\xff\xfe"'),
    "nested-987": REQUESTED % (b"%s", b"[" * 987 + b"]" * 987),
    "garbage": b"garbage %s",
    "other-execution": REQUESTED % (b"someone-else", b"1"),  # the body names another execution
}


async def _status(spear, client, execution_id: str) -> dict:
    reply, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
    return reply


async def _until(predicate, timeout: float = 15.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


async def _stored_terminals(spear, client, execution_id: str) -> int:
    info = await client.jetstream().stream_info(
        spear.names.stream, subjects_filter=spear.names.execution_events(execution_id)
    )
    return sum(n for subject, n in (info.state.subjects or {}).items() if subject.rsplit(".", 1)[-1] in TERMINAL_KINDS)


@pytest.mark.parametrize("kind", sorted(POISON))
async def test_an_unreadable_invocation_ends_failed_poison_message_once(spear, client, kind):
    execution_id = f"poison-{kind}"
    body = POISON[kind].replace(b"%s", execution_id.encode()) if b"%s" in POISON[kind] else POISON[kind]
    await client.publish(spear.names.append("demo", execution_id, "requested"), body)

    async def failed():
        reply = await _status(spear, client, execution_id)
        return reply if reply.get("found") and reply["result"]["status"] == ExecutionStatus.FAILED else None

    reply = await _until(failed, what=f"{execution_id} ends FAILED")
    assert reply["result"]["error_code"] == "POISON_MESSAGE"
    assert "cannot be read" in reply["result"]["error_message"]
    assert await _stored_terminals(spear, client, execution_id) == 1
    await spear.caught_up()
    health, _ = await spear.call(client, "get_health", {})
    # degraded for a while, with the reason: an operator sees what no worker could run
    assert health["status"] == "degraded", health
    assert "poison invocation ended" in health["message"] and execution_id in health["message"], health
    assert "1 poison invocations" in health["message"], health
    # and everything else still works
    ok, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="after"))
    assert ok["result"]["result"] == "after"


class _BrokenFunctions(dict):
    """A task whose code fails while the worker looks a function up: a bug, not a function error."""

    def get(self, name, default=None):
        raise RuntimeError("task code is broken")


broken = Task(task_id="broken")


@broken.function
def echo(value):
    return value


broken.functions = _BrokenFunctions(broken.functions)


@pytest_asyncio.fixture
async def spear_broken(settings):
    tuned = with_overrides(settings, worker={"poison_after": 2})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, tuned, [broken])
        await _until(lambda: asyncio.sleep(0, running.service.tasks.get("broken")), what="task registered")
        yield running


async def test_an_invocation_that_keeps_failing_ends_poison_after_n_deliveries(spear_broken, client):
    spear = spear_broken
    accepted, _ = await spear.call(
        client, "invoke_function", {**invoke_body("echo", "ASYNC", value=1), "task_id": "broken"}
    )
    execution_id = accepted["execution_id"]

    async def failed():
        reply = await _status(spear, client, execution_id)
        return reply if reply["result"]["status"] == ExecutionStatus.FAILED else None

    reply = await _until(failed, what="the broken invocation ends")
    assert reply["result"]["error_code"] == "POISON_MESSAGE"
    assert "2 deliveries failed" in reply["result"]["error_message"]
    assert "task code is broken" in reply["result"]["error_message"]
    assert await _stored_terminals(spear, client, execution_id) == 1


async def test_a_bad_stored_event_does_not_freeze_the_projection(spear, client):
    accepted, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=1))
    # invalid UTF-8 on an append subject once killed the projection's loop for good
    await client.publish(
        spear.names.append("demo", accepted["execution_id"], "log"), b'{"type":"log","message":"\xff"}'
    )
    await client.publish(spear.names.append("demo", "x1", "started"), b"[" * 5000)
    after, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="later"))
    await spear.caught_up()
    listed, _ = await spear.call(client, "list_executions", {"task_id": "demo"})
    ids = {e["execution_id"]: e["status"] for e in listed["executions"]}
    assert ids[after["execution_id"]] == ExecutionStatus.COMPLETED  # reached the state bucket: not frozen
    assert ids[accepted["execution_id"]] == ExecutionStatus.COMPLETED
    status = spear.projection.status()
    assert status.skipped_events == 2 and status.running and not status.stalled
    health, _ = await spear.call(client, "get_health", {})
    assert health["status"] == "healthy" and "2 unreadable events skipped" in health["message"], health

    # a projection rebuilt from the log replays the bad events too, and keeps up
    await spear.projection.stop()
    await rebuild(spear.nc, spear.settings)
    async with AsyncExitStack() as stack:
        fresh = await components.start_projection(stack, spear.nc, spear.settings)
        again, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="again"))
        await spear.caught_up(fresh)
        assert fresh.status().skipped_events == 2
        listed, _ = await spear.call(client, "list_executions", {"task_id": "demo"})
        assert {e["execution_id"] for e in listed["executions"]} >= {after["execution_id"], again["execution_id"]}


async def test_a_message_published_to_the_projections_inbox_never_stops_its_connection(spear, client):
    """The projection takes its deliveries inside the connection's read loop (rawsub): a message
    someone publishes to its pull inbox (no JetStream ack subject) once raised there and ended
    that loop: the process read nothing more (no reply, no status, no state written)."""
    await client.publish(spear.projection.consumer._inbox, b"not a delivery")
    after, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="later"))
    assert after["result"]["status"] == ExecutionStatus.COMPLETED
    await spear.caught_up()
    reply = await _status(spear, client, after["execution_id"])
    assert reply["found"] and reply["result"]["status"] == ExecutionStatus.COMPLETED


async def test_subjects_that_are_not_utf8_stop_nothing(spear, client, nats_url):
    """A request whose reply subject is not UTF-8, and an event stored on such a subject (which
    a worker's consumer and the projection are then delivered): nats-py decoded both strictly in
    the read loop and ended it, and the gateway answered nothing more. Any client may publish them."""
    status = spear.names.api("get_execution_status").encode()
    stored_on = spear.names.append("demo", "junk", "requested").encode().replace(b"junk", b"j\xffnk")
    await publish_raw(nats_url, b"PUB %s _INBOX.\xff\xfe 2\r\n{}\r\n" % status + b"PUB %s 5\r\nhello\r\n" % stored_on)
    after, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="later"))
    assert after["result"]["status"] == ExecutionStatus.COMPLETED
    later = await spear.call(client, "invoke_function", {**invoke_body("echo", value=2), "execution_mode": "ASYNC"})
    await spear.status_until(client, later[0]["execution_id"], has_status(ExecutionStatus.COMPLETED))
    await spear.caught_up()
    reply = await _status(spear, client, after["execution_id"])
    assert reply["found"] and reply["result"]["status"] == ExecutionStatus.COMPLETED
    # and a projection rebuilt from the log replays it (as junk) and keeps up
    await spear.projection.stop()
    await rebuild(spear.nc, spear.settings)
    async with AsyncExitStack() as stack:
        fresh = await components.start_projection(stack, spear.nc, spear.settings)
        await spear.caught_up(fresh)
        assert fresh.status().skipped_events >= 1
