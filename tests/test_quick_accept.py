"""ASYNC calls accepted without a task (spear/api/quickaccept.py): the same reply, the same stored
event and the same errors as the usual path, which takes whatever the quick one does not."""

import asyncio
import io
import json
import logging
import time
from contextlib import AsyncExitStack
from types import SimpleNamespace

import msgspec
import nats.errors
import nats.js.errors
import pytest

from spear.aio import SharedReads, poll_until
from spear.api.table import Operation
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.contract import GetHealthRequest
from spear.core.enums import ExecutionStatus
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream import counting, rawrequests
from spear.jetstream.connection import connect
from spear.service.operations import Service
from spear.telemetry.logs import JsonFormatter
from tests.conftest import has_status, invoke_body, off_its_subjects

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def start_parts(stack, settings):
    nc = await connect(settings, "test-quick")
    stack.push_async_callback(nc.close)
    await components.start_worker(stack, nc, settings, [demo])
    await components.start_projection(stack, nc, settings)
    service = await components.start_service(stack, nc, settings)
    gateway = await components.start_gateway(stack, service)
    return Names(settings.subject_prefix), service, gateway


@pytest.fixture
async def parts(settings):
    async with AsyncExitStack() as stack:
        yield await start_parts(stack, settings)


async def invoke(client, names, body, headers=None):
    for _ in range(20):  # no responder while a connection reconnects: a client tries again (as `Spear.call`)
        try:
            msg = await client.request(
                names.api("invoke_function"), msgspec.json.encode(body), timeout=10, headers=headers
            )
            return msgspec.json.decode(msg.data), msg.headers or {}
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.1)
    raise AssertionError("no responder to invoke_function")


async def stored_requested(client, names, execution_id):
    found = await client.jetstream().get_last_msg(names.stream, names.event("demo", execution_id, "requested"))
    return msgspec.json.decode(found.data), found.headers or {}


async def status_of(client, names, execution_id):
    body = msgspec.json.encode({"execution_id": execution_id})
    return msgspec.json.decode((await client.request(names.api("get_execution_status"), body, timeout=10)).data)


async def test_async_calls_are_accepted_without_a_task_as_the_usual_path_accepts_them(parts, client):
    names, _, gateway = parts
    body = invoke_body("echo", mode="ASYNC", value=7)
    await invoke(client, names, body)  # the first reads the queue figure and the estimate: the usual path
    before = gateway.quick.accepted
    quick, quick_headers = await invoke(client, names, body)
    assert gateway.quick.accepted == before + 1
    usual, _ = await invoke(client, names, body, headers={"traceparent": TRACEPARENT})  # a caller's header
    assert gateway.quick.accepted == before + 1  # ... goes the usual way
    assert quick["success"] is True and quick["result"]["status"] == ExecutionStatus.PENDING
    assert "Nats-Service-Error-Code" not in quick_headers
    ids = {"execution_id", "status_endpoint", "estimated_completion_ms"}  # (the estimate counts the queue)
    assert {k: v for k, v in quick.items() if k not in ids} == {k: v for k, v in usual.items() if k not in ids}
    assert quick["status_endpoint"] == f"/api/v1/execution/{quick['execution_id']}/status"
    assert quick["estimated_completion_ms"] >= 1 and usual["estimated_completion_ms"] >= 1
    (quick_event, quick_stored), (usual_event, usual_stored) = [
        await stored_requested(client, names, reply["execution_id"]) for reply in (quick, usual)
    ]
    assert quick_stored.keys() == usual_stored.keys()
    assert quick_stored["Nats-Msg-Id"] == f"{quick['execution_id']}:requested"
    assert usual_stored["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]  # the caller's trace
    assert len(quick_stored["traceparent"].split("-")[1]) == 32  # a trace of its own
    assert {k for k in quick_event if quick_event[k] != usual_event[k]} <= {"execution_id", "at"}
    for reply in (quick, usual):
        for _ in range(200):
            status = await status_of(client, names, reply["execution_id"])
            if has_status(ExecutionStatus.COMPLETED)(status):
                break
            await asyncio.sleep(0.02)
        assert status["result"]["result"] == 7, status


async def test_what_the_quick_path_cannot_take_is_answered_by_the_usual_one(parts, client):
    names, _, gateway = parts
    await invoke(client, names, invoke_body("echo", mode="ASYNC", value=1))
    before = gateway.quick.accepted
    missing, headers = await invoke(client, names, {**invoke_body("echo", mode="ASYNC"), "task_id": "nope"})
    assert missing["success"] is False and missing["error_code"] == "NOT_FOUND"
    assert headers["Nats-Service-Error-Code"] == "404"
    bad, _ = await invoke(client, names, {**invoke_body("echo", mode="ASYNC"), "parameters": "x"})
    assert bad["error_code"] == "INVALID_ARGUMENT"
    sync, _ = await invoke(client, names, invoke_body("echo", value=2))
    assert sync["result"]["status"] == ExecutionStatus.COMPLETED and sync["result"]["result"] == 2
    chosen, _ = await invoke(client, names, {**invoke_body("echo", mode="ASYNC", value=3), "execution_id": "mine-1"})
    again, _ = await invoke(client, names, {**invoke_body("echo", mode="ASYNC", value=3), "execution_id": "mine-1"})
    assert chosen["execution_id"] == again["execution_id"] == "mine-1" and again["success"] is True
    assert gateway.quick.accepted == before


PATHS = {"quick": None, "usual": {"traceparent": TRACEPARENT}}  # (a caller's trace goes the usual way)


@pytest.mark.parametrize("path", PATHS)
async def test_an_append_nothing_takes_is_sent_again_until_the_stream_takes_it(settings, client, path):
    """probe58: with the stream's leader lost (a 503, "no responders", until another is elected)
    every call was refused at once for 5-7 s. Nothing was stored, so the append is sent again,
    within its timeout, and the call is accepted once the stream takes appends again."""
    tuned = with_overrides(settings, nats={"request_timeout_ms": 3000})
    async with AsyncExitStack() as stack:
        names, _, gateway = await start_parts(stack, tuned)
        body = invoke_body("echo", mode="ASYNC", value=1)
        await invoke(client, names, body)
        before = gateway.quick.accepted
        config = await off_its_subjects(client, names)
        try:
            call = asyncio.create_task(invoke(client, names, body, headers=PATHS[path]))
            await asyncio.sleep(0.6)
            assert not call.done()
        finally:
            await client.jetstream().update_stream(config)
        reply, _ = await asyncio.wait_for(call, 5)
        assert reply["success"] is True, reply
        assert gateway.quick.accepted == before + (path == "quick")
        stored = await client.jetstream().get_last_msg(names.stream, names.event("demo", reply["execution_id"], "*"))
        assert stored.seq  # (stored, and run: its events follow)
        await poll_until(
            lambda: status_of(client, names, reply["execution_id"]), has_status(ExecutionStatus.COMPLETED), timeout_s=10
        )
        requested = await counting.count_matching(
            client, names.stream, names.event("demo", reply["execution_id"], "requested"), timeout=2
        )
        assert requested == 1


@pytest.mark.parametrize("path", PATHS)
async def test_an_append_nothing_takes_for_its_timeout_is_answered_not_stored(settings, client, path):
    """The stream takes no appends for longer than their timeout: UNAVAILABLE with the execution's
    id, saying it was not stored (it said "may have been stored", probe58), at the timeout."""
    tuned = with_overrides(settings, nats={"request_timeout_ms": 1000})
    async with AsyncExitStack() as stack:
        names, _, gateway = await start_parts(stack, tuned)
        body = invoke_body("echo", mode="ASYNC", value=1)
        await invoke(client, names, body)
        before = gateway.quick.accepted
        config = await off_its_subjects(client, names)
        try:
            began = time.monotonic()
            reply, headers = await invoke(client, names, body, headers=PATHS[path])
            waited_s = time.monotonic() - began
        finally:
            await client.jetstream().update_stream(config)
        assert gateway.quick.accepted == before + (path == "quick")  # answered as `invoke` answers it
        assert reply["success"] is False and reply["error_code"] == "UNAVAILABLE", reply
        assert reply["execution_id"] and "was not stored: call again" in reply["message"], reply
        assert "may have been stored" not in reply["message"]
        assert headers["Nats-Service-Error-Code"] == "503"
        assert 0.8 <= waited_s < 3, waited_s  # sent again for its timeout, not refused at once
        assert gateway.quick.waiting.count == 0
        with pytest.raises(nats.js.errors.NotFoundError):
            await client.jetstream().get_last_msg(names.stream, names.event("demo", reply["execution_id"], "*"))


async def test_an_append_never_answered_is_answered_at_its_timeout_and_a_stop_waits_for_it(settings, client):
    """JetStream takes the append and never answers (here: a subscriber that swallows it): the
    call is answered UNAVAILABLE once `request_timeout_ms` passes, as `invoke` answers it, and a
    gateway stopped meanwhile answers it before it is gone."""
    tuned = with_overrides(settings, nats={"request_timeout_ms": 1000})
    async with AsyncExitStack() as stack:
        names, service, gateway = await start_parts(stack, tuned)
        body = invoke_body("echo", mode="ASYNC", value=1)
        await invoke(client, names, body)
        config = await off_its_subjects(client, names)
        swallow = await client.subscribe(f"{tuned.subject_prefix}.append.>")
        await client.flush()
        try:
            call = asyncio.create_task(invoke(client, names, body))
            await poll_until(lambda: asyncio.sleep(0, gateway.quick.waiting.count), bool, timeout_s=5, interval_s=0.01)
            await gateway.stop()  # waits for it (up to 5 s)
            assert gateway.quick.waiting.count == 0  # answered before the gateway was gone
            reply, headers = await asyncio.wait_for(call, 5)
            assert reply["error_code"] == "UNAVAILABLE" and reply["execution_id"], reply
            assert headers["Nats-Service-Error-Code"] == "503"
            assert rawrequests.pending(service.nc) == 0
        finally:
            await swallow.unsubscribe()
            await client.jetstream().update_stream(config)


async def test_quick_accepts_are_counted_and_their_errors_logged_with_the_execution(parts, client, settings):
    names, _, gateway = parts
    body = invoke_body("echo", mode="ASYNC", value=1)
    await invoke(client, names, body)
    stats = json.loads((await client.request(f"$SRV.STATS.{names.service_name}", b"", timeout=2)).data)
    counted = next(e for e in stats["endpoints"] if e["name"] == "invoke_function")["num_requests"]
    config = await off_its_subjects(client, names)
    other = f"{settings.subject_prefix}_OTHER"  # takes the appends: JetStream refuses them (another stream)
    await client.jetstream().add_stream(name=other, subjects=[f"{settings.subject_prefix}.append.>"])
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("spear.api.gateway").addHandler(handler)
    try:
        before = gateway.quick.accepted
        reply, headers = await invoke(client, names, body)
        assert gateway.quick.accepted == before + 1
        assert reply["error_code"] == "INTERNAL" and headers["Nats-Service-Error-Code"] == "500", reply
    finally:
        logging.getLogger("spear.api.gateway").removeHandler(handler)
        await client.jetstream().delete_stream(other)
        await client.jetstream().update_stream(config)
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [line["execution_id"] for line in logged if line["level"] == "ERROR"] != []
    assert all(line["task_id"] == "demo" and line["function_name"] == "echo" for line in logged)
    stats = json.loads((await client.request(f"$SRV.STATS.{names.service_name}", b"", timeout=2)).data)
    endpoint = next(e for e in stats["endpoints"] if e["name"] == "invoke_function")
    assert endpoint["num_requests"] == counted + 1 and endpoint["last_error"].startswith("INTERNAL: ")


async def test_a_reply_that_cannot_be_encoded_is_answered_as_internal(parts):
    _, _, gateway = parts

    class Odd(msgspec.Struct):
        value: object

    async def odd(service, request):
        return Odd(object())

    sent = []

    async def respond(body, headers):
        sent.append((msgspec.json.decode(body), headers))

    await gateway._serve(Operation("get_health", GetHealthRequest, odd, True), "p.api.x", b"", None, respond)
    [(body, headers)] = sent
    assert body["error_code"] == "INTERNAL" and headers["Nats-Service-Error-Code"] == "500"


async def test_stale_function_figures_are_read_again_before_the_queue_is_ever_read():
    service = Service.__new__(Service)  # the estimate's parts only
    service.names = Names("p")
    key = service.names.function_stats_key("demo", "echo")
    service._estimates = {key: (time.monotonic() - 5, 80, 0)}
    service._stats_reads = SharedReads()
    reads = []

    async def read_estimate(key, now):
        reads.append(key)
        return 80, 0

    service._read_estimate = read_estimate
    service.admission = SimpleNamespace(depth_at_hand=lambda task_id: None)  # no queue figure yet
    assert service._estimate_now(SimpleNamespace(task_id="demo", function_name="echo")) is None
    await asyncio.sleep(0)
    assert reads == [key]
