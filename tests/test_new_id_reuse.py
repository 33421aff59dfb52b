"""An execution id used before, sent again with `Spear-New-Execution-Id: true` (which tells the
gateway the id names no execution, so it may run an inline function itself before anything is
stored): the same id with another request is ALREADY_EXISTS, an equal one joins the stored
execution, on every path (inline SYNC, usual SYNC, ASYNC; NATS and HTTP), and no reply carries a
result the log does not hold (probe57: the inline chain's end was dropped by JetStream as a
duplicate of the stored end, acknowledged, and its result replied)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import nats
import pytest
import pytest_asyncio

import spear
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.contract import format_timestamp
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import Completed, Requested, Started, StoredResult, envelope
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream.connection import connect
from spear.service.callerwait import NEW_ID_HEADER
from spear.service.operations import _fingerprint
from tests.conftest import Spear, call_body, has_status
from tests.processes import free_port

NEW_ID = {NEW_ID_HEADER: "true"}

reuse = spear.Task("reuse", description="an inline function that counts its runs")
runs: collections.Counter[str] = collections.Counter()  # execution id -> calls, gateway and worker


@reuse.function(inline=True)
def echo(ctx: spear.Context, value: object) -> object:
    runs[ctx.execution_id] += 1
    ctx.log(f"got {value!r}")
    return value


@reuse.function
def plain(value: object) -> object:
    return value


@dataclass
class Caller:
    """Calls invoke_function over NATS or HTTP and gives the reply as the NATS body, with the
    HTTP status (or the Nats-Service-Error-Code) as a number (200 for a success)."""

    running: Spear
    via: str
    http: aiohttp.ClientSession | None = None

    async def invoke(self, body: dict, headers: dict[str, str] | None = None) -> tuple[dict, int]:
        if self.via == "http":
            assert self.http is not None
            async with self.http.post(f"{self.running.http}/api/v1/invoke", json=body, headers=headers) as response:
                return await response.json(), response.status
        data = json.dumps(body).encode()
        msg = await self.running.client.request(self.running.names.api("invoke_function"), data, 10, headers=headers)
        return json.loads(msg.data), int((msg.headers or {}).get("Nats-Service-Error-Code", "200"))


async def _start(settings, with_worker: bool):
    """spear whose gateway runs `reuse`'s inline SYNC calls (as `spear up`), with an HTTP API, and
    a worker for `reuse` unless `with_worker` is False."""
    stack = AsyncExitStack()
    nc = await connect(settings, "test-spear")
    stack.push_async_callback(nc.close)
    worker = await components.start_worker(stack, nc, settings, [demo, reuse]) if with_worker else None
    projection = await components.start_projection(stack, nc, settings)
    service = await components.start_service(stack, nc, settings, inline_tasks=[demo, reuse])
    await components.start_gateway(stack, service)
    port = free_port()
    await components.start_http(stack, service, port, host="127.0.0.1")
    running = Spear(settings, Names(settings.subject_prefix), nc, service, projection, worker)
    running.http = f"http://127.0.0.1:{port}"
    running.client = await nats.connect(settings.nats.urls[0])
    stack.push_async_callback(running.client.close)
    return stack, running


async def _callers(adapter: str, settings, with_worker: bool) -> AsyncIterator[Caller]:
    settings = with_overrides(settings, nats={"request_timeout_ms": 1000})
    stack, running = await _start(settings, with_worker=with_worker)
    async with stack, aiohttp.ClientSession() as http:
        yield Caller(running, adapter, http)


@pytest_asyncio.fixture(params=["nats", "http"])
async def caller(request, settings):
    async for one in _callers(request.param, settings, with_worker=True):
        yield one


@pytest_asyncio.fixture(params=["nats", "http"])
async def no_worker(request, settings):
    async for one in _callers(request.param, settings, with_worker=False):
        yield one


def _body(execution_id: str, value: object, mode: str = "SYNC", function: str = "echo") -> dict:
    return {**call_body(function, mode=mode, task_id="reuse", value=value), "execution_id": execution_id}


async def _history(running: Spear, execution_id: str) -> list[tuple[int, str]]:
    return [(s.seq, s.event.kind) for s in await running.service.store.history(execution_id)]


async def _stored_result(running: Spear, execution_id: str) -> dict:
    reply, _ = await running.call(running.client, "get_execution_status", {"execution_id": execution_id})
    assert reply["found"], reply
    return reply["result"]


def _refused(reply: dict, code: int) -> bool:
    return (reply.get("success"), reply.get("error_code"), code) == (False, "ALREADY_EXISTS", 409)


async def test_an_inline_call_marked_new_on_a_used_id_with_another_request_is_already_exists(caller):
    """The probe's case, inside JetStream's duplicate window: the chain's end had the stored end's
    message id, so JetStream dropped it as a duplicate and acknowledged it, and the gateway
    replied success with a result it never stored."""
    running, eid = caller.running, f"used-{caller.via}"
    first, code = await caller.invoke(_body(eid, "stored"), NEW_ID)
    assert code == 200 and first["result"]["result"] == "stored", first
    before = await _history(running, eid)
    assert [kind for _, kind in before] == ["requested", "started", "log", "completed"]

    again, code = await caller.invoke(_body(eid, "other request"), NEW_ID)
    assert _refused(again, code), again
    assert "different request" in again["message"]
    assert await _history(running, eid) == before
    assert (await _stored_result(running, eid))["result"] == "stored"


async def test_an_equal_inline_call_marked_new_on_a_used_id_replies_the_stored_result(caller):
    """The same request joins: its reply is the stored end (its times, its attempt), not a run of
    the gateway's own that was never stored."""
    running, eid = caller.running, f"joined-{caller.via}"
    first, _ = await caller.invoke(_body(eid, {"n": 1}), NEW_ID)
    before = await _history(running, eid)
    await asyncio.sleep(0.01)  # a run now would have other times
    again, code = await caller.invoke(_body(eid, {"n": 1}), NEW_ID)
    assert code == 200 and again["success"], again
    assert again["result"] == first["result"] == await _stored_result(running, eid)
    assert await _history(running, eid) == before


async def test_a_used_id_whose_requested_is_the_stream_s_newest_message_is_not_continued(no_worker):
    """A pending execution's `requested` (its worker not there yet) is the stream's newest message:
    an inline chain under its id, marked new, had its own `requested` dropped as a duplicate, and
    its `started` fenced only on the newest message id being `<id>:requested`: the gateway's run
    of another request was stored as that execution's attempt."""
    running, eid = no_worker.running, f"pending-{no_worker.via}"
    accepted, code = await no_worker.invoke(_body(eid, "queued", mode="ASYNC"))
    assert code in (200, 202) and accepted["success"], accepted
    before = await _history(running, eid)
    assert [kind for _, kind in before] == ["requested"]

    again, code = await no_worker.invoke(_body(eid, "other request"), NEW_ID)
    assert _refused(again, code), again
    equal, _ = await no_worker.invoke(_body(eid, "queued"), {**NEW_ID, "Spear-Wait-Ms": "500"})
    assert equal["error_code"] == "DEADLINE_EXCEEDED", equal  # joined: waits for the worker to run it
    assert await _history(running, eid) == before


async def test_concurrent_inline_calls_marked_new_under_one_id_store_one_and_refuse_the_other(caller):
    """Two callers mark one id new at once with other requests: one run is stored and replied,
    the other is ALREADY_EXISTS, whichever chain JetStream takes first."""
    running, eid = caller.running, f"both-{caller.via}"
    replies = await asyncio.gather(*(caller.invoke(_body(eid, value), NEW_ID) for value in ("a", "b")))
    done = [reply for reply, code in replies if code == 200]
    assert len(done) == 1 and sum(_refused(reply, code) for reply, code in replies) == 1, replies
    assert done[0]["result"] == await _stored_result(running, eid)
    assert [kind for _, kind in await _history(running, eid)] == ["requested", "started", "log", "completed"]


async def test_an_inline_call_marked_new_on_an_id_with_only_junk_stored_is_already_exists(caller):
    """What is stored under the id is no request (junk on its subjects, which a worker ends as a
    poison message, a `failed` of no request, or not yet): the usual path's `requested` is
    refused and the id is ALREADY_EXISTS. The inline chain was refused too, and its call waited
    for that execution's end and replied the poison failure as its own result (or, before the
    worker's end, an end that would never come)."""
    running, eid = caller.running, f"junk-{caller.via}"
    await running.client.request(f"{running.names.prefix}.append.reuse.{eid}.requested", b"not an event", 5)
    usual, code = await caller.invoke(_body(eid, 1))
    assert _refused(usual, code), usual
    again, code = await caller.invoke(_body(eid, 1), {**NEW_ID, "Spear-Wait-Ms": "4000"})
    assert _refused(again, code), again


def _stored_attempt(eid: str, worker_id: str, value: object) -> list:
    """An inline attempt of `echo` as a gateway stores it, but appended without message ids: what
    JetStream remembers of it once its duplicate window (2 minutes) has passed."""
    parameters = {"value": value}
    request = Requested(
        execution_id=eid,
        task_id="reuse",
        function_name="echo",
        at=format_timestamp(time.time()),
        execution_mode=ExecutionMode.SYNC,
        parameters=parameters,
        fingerprint=_fingerprint("reuse", "echo", parameters),
    )
    started = Started(**envelope(request, 1), worker_id=worker_id)
    result = StoredResult(status=ExecutionStatus.COMPLETED, result=value, attempt=1)
    return [request, started, Completed(**envelope(request, 1), result=result)]


@pytest.mark.parametrize("gateway", ["this", "another"])
async def test_past_the_duplicate_window_a_used_id_marked_new_is_judged_by_its_request(caller, gateway):
    """Past the window only the fences speak: the chain is refused and the gateway reads the
    history. It took the stored events for its own chain's (same kinds, its own worker id) and
    replied the stored end to another request; stored by another gateway, it waited for it."""
    running, eid = caller.running, f"late-{gateway}-{caller.via}"
    worker_id = running.service.inline.worker_id if gateway == "this" else "elsewhere-1-gateway"
    last = 0
    for event in _stored_attempt(eid, worker_id, "stored"):
        last = (await running.service.store.append(event, expect_last_seq=last)).seq
    before = await _history(running, eid)

    again, code = await caller.invoke(_body(eid, "other request"), NEW_ID)
    assert _refused(again, code), again
    equal, code = await caller.invoke(_body(eid, "stored"), NEW_ID)
    assert code == 200 and equal["result"] == await _stored_result(running, eid), equal
    assert await _history(running, eid) == before


@pytest.mark.parametrize("mode", ["SYNC", "ASYNC", "STREAM"])
async def test_the_usual_path_marked_new_on_a_used_id_joins_or_refuses(caller, mode):
    """Not inline (or ASYNC, STREAM): the `requested` append is fenced on the id having no event,
    header or not (never affected: here so that every path is tried)."""
    running, eid = caller.running, f"usual-{mode}-{caller.via}"
    function = "plain" if mode == "SYNC" else "echo"
    first, _ = await caller.invoke(_body(eid, 1, mode=mode, function=function), NEW_ID)
    assert first["success"], first
    await running.status_until(running.client, eid, has_status("EXECUTION_STATUS_COMPLETED"))
    before = await _history(running, eid)
    again, code = await caller.invoke(_body(eid, 2, mode=mode, function=function), NEW_ID)
    assert _refused(again, code), again
    equal, _ = await caller.invoke(_body(eid, 1, mode=mode, function=function), NEW_ID)
    assert equal["success"] and equal["message"] != "Execution accepted", equal
    assert await _history(running, eid) == before
