"""History forged over plain NATS: the subject is the authority and only what the stream stored
acts. Forged publishes (even with imitated re-publish headers) neither answer a SYNC caller,
nor cancel a running execution, nor end an SSE stream, nor steer retention; garbage on a
terminal subject does not make a waiter hang."""

import asyncio
import json
import time

import msgspec

from spear.core.enums import TERMINAL_STATUSES, ExecutionStatus
from spear.core.events import Completed, StoredResult, encode_event
from tests.conftest import invoke_body


def _forged_completed(execution_id: str, value="forged", task_id="demo") -> bytes:
    result = StoredResult(status=ExecutionStatus.COMPLETED, result=value, attempt=1)
    return encode_event(
        Completed(execution_id=execution_id, task_id=task_id, function_name="sleep", at="x", attempt=1, result=result)
    )


def _imitated(names, seq: int = 999_999) -> dict:
    """The headers the stream's re-publish carries: anyone may copy them."""
    return {"Nats-Stream": names.stream, "Nats-Sequence": str(seq), "Nats-Subject": "x", "Nats-Last-Sequence": "0"}


async def _running(spear, client, execution_id: str) -> None:
    for _ in range(300):
        reply, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
        if reply.get("found") and reply["result"]["status"] == ExecutionStatus.RUNNING:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{execution_id} never ran")


async def _sync_sleep(spear, client, execution_id: str, ms: int):
    body = {**invoke_body("sleep", ms=ms), "execution_id": execution_id}
    return asyncio.ensure_future(spear.call(client, "invoke_function", body, timeout=30))


async def test_a_forged_completion_never_answers_a_sync_caller(spear, client):
    call = await _sync_sleep(spear, client, "sync-forged", 600)
    await _running(spear, client, "sync-forged")
    subject = spear.names.event("demo", "sync-forged", "completed")
    await client.publish(subject, _forged_completed("sync-forged"))  # a plain core publish
    await client.publish(subject, _forged_completed("sync-forged"), headers=_imitated(spear.names))
    reply, _ = await call
    assert reply["result"]["result"] == 600  # the real one, not "forged"
    stored = [e.kind for e, _ in await spear.service.store.history("sync-forged")]
    assert stored == ["requested", "started", "completed"]


async def test_garbage_on_a_terminal_subject_does_not_make_a_waiter_hang(spear, client):
    call = await _sync_sleep(spear, client, "sync-garbage", 300)
    await _running(spear, client, "sync-garbage")
    for kind in ("completed", "failed", "cancelled", "timed_out"):
        subject = spear.names.event("demo", "sync-garbage", kind)
        await client.publish(subject, b"garbage")
        await client.publish(subject, b"garbage", headers=_imitated(spear.names))
    began = time.monotonic()
    reply, _ = await asyncio.wait_for(call, 10)
    assert reply["result"]["result"] == 300
    assert time.monotonic() - began < 5  # answered when it ended, not at the end of its wait (32 s)


async def test_a_forged_cancel_request_does_not_stop_a_running_execution(spear, client):
    call = await _sync_sleep(spear, client, "cancel-forged", 500)
    await _running(spear, client, "cancel-forged")
    forged = {
        "type": "cancel_requested",
        "execution_id": "cancel-forged",
        "task_id": "demo",
        "function_name": "sleep",
        "at": "x",
        "attempt": 1,
        "force": True,
    }
    subject = spear.names.event("demo", "cancel-forged", "cancel_requested")
    await client.publish(subject, json.dumps(forged).encode(), headers=_imitated(spear.names))
    await client.publish(subject, json.dumps(forged).encode())
    reply, _ = await call
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED and reply["result"]["result"] == 500


async def test_an_append_whose_body_disagrees_with_its_subject_is_ignored(spear, client):
    """Stored (plain NATS may publish on P.append), but no reader acts on it: the running
    execution still completes with its real result, and retention never purges the execution
    the body names."""
    victim, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=2000))
    done, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="done"))
    await _running(spear, client, victim["execution_id"])
    # on the ended execution's subject, the body of the running one: "it completed"
    await client.request(
        spear.names.append("demo", done["execution_id"], "completed"), _forged_completed(victim["execution_id"])
    )
    # on the running one's subject, a body that names another execution
    await client.request(
        spear.names.append("demo", victim["execution_id"], "completed"), _forged_completed("someone-else")
    )
    await spear.caught_up()
    state = await spear.service.execution_state(victim["execution_id"])
    assert state.status == ExecutionStatus.RUNNING
    expired = await spear.projection.retention.sweep(now=time.time() + 10 * 24 * 3600)
    assert expired == [done["execution_id"]]  # the ended one only, never the running one
    for _ in range(300):
        reply, _ = await spear.call(client, "get_execution_status", {"execution_id": victim["execution_id"]})
        if reply["result"]["status"] in TERMINAL_STATUSES:
            break
        await asyncio.sleep(0.02)
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED and reply["result"]["result"] == 2000
    raw = msgspec.json.decode(encode_event((await spear.service.store.last(victim["execution_id"])).event))
    assert raw["result"]["result"] == 2000
