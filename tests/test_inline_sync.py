"""SYNC calls of inline functions run by the gateway itself (spear.service.inline): one chain of
appends, the same events, status and results as a worker's run, and the function run once."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from contextlib import AsyncExitStack

import msgspec
import nats
import pytest
import pytest_asyncio

import spear
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.contract import format_timestamp, parse_timestamp
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import Completed, Event, Requested, Retrying, Started, StoredResult, cancelled, envelope
from spear.core.ids import new_execution_id
from spear.core.names import Names
from spear.core.state import backoff_left_ms
from spear.demo import demo
from spear.jetstream.connection import connect
from spear.service.operations import Service
from tests.conftest import Spear, call_body, has_status

inl = spear.Task("inl", description="inline functions that count their runs")
runs: collections.Counter[str] = collections.Counter()  # execution id -> calls, here and in the worker


@inl.function(inline=True)
def record(ctx: spear.Context, value: object) -> object:
    runs[ctx.execution_id] += 1
    ctx.log(f"got {value!r}")
    ctx.progress(0.5, "half way")
    return value


@inl.function(inline=True, max_retries=1)
def fails_once(ctx: spear.Context) -> int:
    runs[ctx.execution_id] += 1
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return ctx.attempt


@inl.function(inline=True)
def odd_text(ctx: spear.Context, fail: bool) -> str:
    name = b"report-\xff.txt".decode("utf-8", "surrogateescape")  # a lone surrogate, as os.listdir gives
    ctx.log(f"opened {name}")
    if fail:
        raise FileNotFoundError(name)
    return "done"


@inl.function
def plain(value: object) -> object:
    return value


@inl.function(inline=True, max_retries=0)
def exits(how: str) -> None:
    """Raises what ends a program: here, only this execution fails."""
    raise {"interrupt": KeyboardInterrupt, "exit": SystemExit, "cancel": asyncio.CancelledError}[how](how)


BACKOFF_MS = 300


@pytest_asyncio.fixture
async def fast(settings):
    """spear with a worker and a gateway that both load `inl` (as `spear up` does)."""
    settings = with_overrides(
        settings, retry={"initial_backoff_ms": BACKOFF_MS, "jitter": 0.0}, nats={"request_timeout_ms": 1000}
    )
    async with AsyncExitStack() as stack:
        nc = await connect(settings, "test-spear")
        stack.push_async_callback(nc.close)
        worker = await components.start_worker(stack, nc, settings, [demo, inl])
        projection = await components.start_projection(stack, nc, settings)
        service = await components.start_service(stack, nc, settings, inline_tasks=[demo, inl])
        await components.start_gateway(stack, service)
        running = Spear(settings, Names(settings.subject_prefix), nc, service, projection, worker)
        running.client = await nats.connect(settings.nats.urls[0])
        stack.push_async_callback(running.client.close)
        yield running


async def _invoke(running: Spear, body: dict) -> dict:
    reply, _ = await running.call(running.client, "invoke_function", body)
    return reply


async def _kinds(running: Spear, execution_id: str) -> list[str]:
    return [stored.event.kind for stored in await running.service.store.history(execution_id)]


async def _worker_done(running: Spear) -> None:
    """Until the worker consumer of `inl` has nothing pending and nothing unacknowledged."""
    js = running.nc.jetstream()
    for _ in range(600):
        info = await js.consumer_info(running.names.stream, running.names.worker_consumer("inl"))
        if not info.num_pending and not info.num_ack_pending:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the worker did not take every invocation: {info}")


async def test_a_sync_inline_call_is_run_and_stored_by_the_gateway(fast, client, caplog):
    notified: list[str] = []  # what a subscriber on the task's events sees

    async def on_event(msg) -> None:
        notified.append(msg.subject.rsplit(".", 2)[-2] + ":" + msg.subject.rsplit(".", 1)[-1])

    await client.subscribe(fast.names.event("inl", "*", "*"), cb=on_event)
    await client.flush()
    reply = await _invoke(fast, call_body("record", task_id="inl", value={"a": [1]}))
    assert reply["success"] and reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED"
    assert reply["result"]["result"] == {"a": [1]}
    execution_id = reply["execution_id"]
    history = await fast.service.store.history(execution_id)
    assert [s.event.kind for s in history] == ["requested", "started", "log", "log", "completed"]
    assert [s.seq for s in history] == list(range(history[0].seq, history[0].seq + 5))  # one chain
    assert history[1].event.worker_id == fast.service.inline.worker_id != fast.worker.worker_id
    kinds = ["requested", "started", "log", "log", "completed"]
    for _ in range(500):  # each stored event is re-published once, in order
        if len(notified) >= len(kinds):
            break
        await asyncio.sleep(0.01)
    assert notified == [f"{execution_id}:{kind}" for kind in kinds]
    await _worker_done(fast)  # the worker got `requested`, saw the end and acknowledged
    assert runs[execution_id] == 1
    assert fast.service.completions.consumer == ""  # no wait needed it: no terminal event sent here
    assert not [r for r in caplog.records if r.name.startswith("spear.worker") and r.levelno >= logging.WARNING]
    assert await _kinds(fast, execution_id) == ["requested", "started", "log", "log", "completed"]

    # The same call on the usual path (a client-chosen id): the same events, status and result.
    usual = await _invoke(fast, {**call_body("record", task_id="inl", value={"a": [1]}), "execution_id": "usual-1"})
    assert usual["result"]["result"] == reply["result"]["result"]
    assert await _kinds(fast, "usual-1") == await _kinds(fast, execution_id)
    seen = []
    for run in (execution_id, "usual-1"):
        status, _ = await fast.status_until(client, run, has_status("EXECUTION_STATUS_COMPLETED"))
        logs, _ = await fast.call(client, "get_execution_status", {"execution_id": run, "include_logs": True})
        seen.append((_comparable(status), [line.split(" ", 1)[-1] for line in logs["logs"]]))
    assert seen[0] == seen[1] and len(seen[0][1]) == 2
    assert seen[0][0]["result"]["result"] == {"a": [1]} and seen[0][0]["result"]["attempt"] == 1
    fast_status, _ = await fast.call(client, "get_execution_status", {"execution_id": execution_id})
    assert fast_status["execution"]["worker_id"] == fast.service.inline.worker_id


@pytest.mark.parametrize("fail", [False, True], ids=["logs", "raises"])
async def test_text_no_event_can_carry_is_stored_escaped_on_either_path(fast, client, fail):
    """A lone surrogate in what a function logs or raises (a file name decoded with
    surrogateescape) is stored escaped. Unescaped, the gateway's chain broke off after `started`
    (an INTERNAL reply, then WORKER_LOST), and a worker's end could not be stored either."""
    body = call_body("odd_text", task_id="inl", fail=fail)
    end = "failed" if fail else "completed"
    for request in (body, {**body, "execution_id": f"usual-odd-{end}"}):  # the gateway's run, a worker's
        reply = await _invoke(fast, request)
        assert reply["success"], reply
        assert reply["result"]["status"] == f"EXECUTION_STATUS_{end.upper()}"
        assert await _kinds(fast, reply["execution_id"]) == ["requested", "started", "log", end]
        status, _ = await fast.call(
            client, "get_execution_status", {"execution_id": reply["execution_id"], "include_logs": True}
        )
        assert status["logs"][0].endswith("opened report-\\udcff.txt")
        if fail:
            assert status["result"]["error_code"] == "FUNCTION_ERROR"
            assert status["result"]["error_message"] == "FileNotFoundError: report-\\udcff.txt"
            assert "FileNotFoundError: report-\\udcff.txt" in status["result"]["metrics"]["traceback"]


def _comparable(status: dict) -> dict:
    """A status without what differs between any two runs (ids, times, the worker)."""
    varying = {"execution_id", "started_at", "completed_at", "requested_at", "created_at", "updated_at"}
    varying |= {"execution_time_ms", "memory_used_bytes", "worker_id", "instance_id", "duration_ms", "queue_ms"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in varying}
        return value

    return strip(status)


async def test_a_retryable_failure_is_retried_by_a_worker_after_the_backoff(fast):
    reply = await _invoke(fast, call_body("fails_once", task_id="inl"))
    assert reply["success"] and reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED"
    assert reply["result"]["result"] == 2 and reply["result"]["attempt"] == 2
    assert fast.service.completions.consumer  # its wait for the worker's end made the consumer
    history = await fast.service.store.history(reply["execution_id"])
    kinds = [(s.event.kind, s.event.attempt) for s in history]
    assert kinds == [("requested", 0), ("started", 1), ("retrying", 1), ("started", 2), ("completed", 2)]
    retrying, second = history[2].event, history[3].event
    assert isinstance(retrying, Retrying) and retrying.delay_ms == BACKOFF_MS
    assert second.worker_id == fast.worker.worker_id
    # `at` is cut to the millisecond: the second attempt starts no sooner than the backoff allows
    assert round((parse_timestamp(second.at) - parse_timestamp(retrying.at)) * 1000) >= BACKOFF_MS - 1
    assert runs[reply["execution_id"]] == 2


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"execution_mode": "ASYNC"}, id="async"),
        pytest.param({"execution_id": "chosen-by-client"}, id="client-execution-id"),
        pytest.param({"function_name": "plain"}, id="not-inline"),
        pytest.param({"task_id": "demo", "function_name": "calculate_fibonacci", "parameters": []}, id="demo-other"),
    ],
)
async def test_other_calls_take_the_usual_path(fast, client, change):
    body = {**call_body("record", task_id="inl", value=3), **change}
    if change.get("function_name") == "calculate_fibonacci":
        body["parameters"] = [{"name": "n", "value": 10}]
    reply = await _invoke(fast, body)
    assert reply["success"]
    status, _ = await fast.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_COMPLETED"))
    assert status["execution"]["worker_id"] == fast.worker.worker_id


async def test_the_setting_turns_it_off(fast):
    assert Service(fast.nc, fast.settings, inline_tasks=[inl]).inline is not None
    off = with_overrides(fast.settings, api={"inline_sync": False})
    assert Service(fast.nc, off, inline_tasks=[inl]).inline is None
    assert Service(fast.nc, fast.settings).inline is None  # no tasks loaded here: `spear gateway`


async def test_bad_parameters_are_refused_as_before_with_nothing_stored(fast):
    refused = await _invoke(fast, call_body("record", task_id="inl", wrong=1))
    assert (refused["success"], refused["error_code"]) == (False, "INVALID_ARGUMENT")
    assert "value" in refused["message"]
    info = await fast.nc.jetstream().stream_info(fast.names.stream)
    assert info.state.messages == 0


async def test_concurrent_calls_each_end_once_and_run_once(fast):
    replies = await asyncio.gather(*(_invoke(fast, call_body("record", task_id="inl", value=i)) for i in range(40)))
    assert [r["result"]["result"] for r in replies] == list(range(40))
    await _worker_done(fast)
    for reply in replies:
        assert await _kinds(fast, reply["execution_id"]) == ["requested", "started", "log", "log", "completed"]
        assert runs[reply["execution_id"]] == 1


def _attempt(fast: Spear, function: str) -> tuple[list[Event], list[str]]:
    """The events and message ids of a gateway's attempt of `function`, as `InlineCalls.run` makes them."""
    inline = fast.service.inline
    request = Requested(
        execution_id=new_execution_id(),
        task_id="inl",
        function_name=function,
        at=format_timestamp(time.time()),
        execution_mode=ExecutionMode.SYNC,
        parameters={"value": 1},
    )
    started = Started(**envelope(request, 1), worker_id=inline.worker_id)
    result = StoredResult(status=ExecutionStatus.COMPLETED, result=1, attempt=1)
    end = Completed(**envelope(request, 1), result=result)
    eid = request.execution_id
    return [request, started, end], [f"{eid}:requested", f"{eid}:started:1:inline", f"{eid}:terminal:1"]


@pytest.mark.parametrize("stored_before", [1, 2])
async def test_a_refused_chain_is_completed_one_by_one(fast, stored_before):
    """A chain is refused from the first message another append got in front of: the prefix
    stored before that stands and the rest is appended, each fenced on the one before."""
    events, msg_ids = _attempt(fast, "record")
    store = fast.service.store
    last = 0
    for event in events[:stored_before]:  # stored, and then a refused chain's rest
        last = (await store.append(event, expect_last_seq=last, headers=fast.service.inline.headers)).seq
    headers = {**fast.service.inline.headers, "traceparent": f"00-{'a1' * 16}-{'b2' * 8}-00"}  # run's
    end = await fast.service.inline._store(events, msg_ids, headers)
    assert isinstance(end, Completed) and fast.service.inline.repaired == 1
    assert await _kinds(fast, events[0].execution_id) == ["requested", "started", "completed"]
    js, names = fast.nc.jetstream(), fast.service.names
    repaired = [await js.get_last_msg(names.stream, names.event("inl", e.execution_id, e.kind)) for e in events]
    assert {msg.headers["traceparent"].split("-")[1] for msg in repaired[stored_before:]} == {"a1" * 16}


async def test_an_execution_another_party_ended_is_left_to_it(fast):
    events, msg_ids = _attempt(fast, "record")
    store = fast.service.store
    requested = await store.append(events[0], expect_last_seq=0)
    await store.append(cancelled(envelope(events[0], 0), "by a client", None), expect_last_seq=requested.seq)
    assert (
        await fast.service.inline._store(events, msg_ids, fast.service.inline.headers) is None
    )  # the caller waits for its end
    assert await _kinds(fast, events[0].execution_id) == ["requested", "cancelled"]


async def test_a_worker_holds_off_while_the_gateway_stores_then_runs_it(fast, client):
    """`requested` of a gateway's attempt stored alone (its gateway stalled, or died): the worker
    it is delivered to waits for the rest, then, delivered again, runs it as usual."""
    events, _ = _attempt(fast, "record")
    request = events[0]
    await fast.service.store.append(request, expect_last_seq=0, headers=fast.service.inline.headers)
    await asyncio.sleep(1.0)  # what must NOT happen: nothing to await
    assert await _kinds(fast, request.execution_id) == ["requested"] and runs[request.execution_id] == 0
    status, _ = await fast.status_until(
        client, request.execution_id, has_status("EXECUTION_STATUS_COMPLETED"), timeout=15
    )
    assert status["execution"]["worker_id"] == fast.worker.worker_id and runs[request.execution_id] == 1


async def test_a_worker_waits_a_moment_for_a_gateway_storing_its_attempt_one_by_one(fast):
    """On a replicated stream a gateway's attempt is appended one event at a time, and a worker
    usually gets `requested` before the end is stored. It reads again for a moment and
    acknowledges once the end is there, instead of holding the invocation (counted as pending
    work, and a `retrying` left waiting) for the long hold-off."""
    events, msg_ids = _attempt(fast, "record")
    store, headers = fast.service.store, fast.service.inline.headers
    appended = await store.append(events[0], expect_last_seq=0, msg_id=msg_ids[0], headers=headers)
    await asyncio.sleep(0.1)  # the worker has it by now, and sees `requested` alone
    for event, msg_id in zip(events[1:], msg_ids[1:], strict=True):
        appended = await store.append(event, expect_last_seq=appended.seq, msg_id=msg_id, headers=headers)
    began = time.monotonic()
    await _worker_done(fast)
    assert time.monotonic() - began < 2.0  # the hold-off is 2 x 1 s + 2 s here
    assert await _kinds(fast, events[0].execution_id) == ["requested", "started", "completed"]
    assert runs[events[0].execution_id] == 0


def test_backoff_left_is_what_remains_of_a_retrying_events_delay():
    env = {"execution_id": "E", "task_id": "t", "function_name": "f", "attempt": 1}
    at = 1_700_000_000.0
    retrying = Retrying(
        **env, at=format_timestamp(at), result=StoredResult(status=ExecutionStatus.FAILED), delay_ms=500
    )
    assert backoff_left_ms(retrying, at + 0.2) == 300
    assert backoff_left_ms(retrying, at + 0.5) == 0
    assert backoff_left_ms(retrying, at + 9) == 0
    assert backoff_left_ms(msgspec.structs.replace(retrying, delay_ms=0), at) == 0
    requested = Requested(**env, at=format_timestamp(at), execution_mode=ExecutionMode.SYNC)
    assert backoff_left_ms(requested, at) == 0
    assert backoff_left_ms(None, at) == 0


@pytest.mark.parametrize(
    "how, raised", [("interrupt", "KeyboardInterrupt"), ("exit", "SystemExit"), ("cancel", "CancelledError")]
)
async def test_an_inline_function_raising_keyboard_interrupt_or_system_exit_fails_only_itself(
    fast, client, how, raised
):
    """Run by the gateway itself: asyncio would have stopped its loop (the whole `spear up`)."""
    reply, _ = await fast.call(client, "invoke_function", call_body("exits", task_id="inl", how=how))
    result = reply["result"]
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), reply
    assert result["error_message"] == f"{raised}: {how}"
    again, _ = await fast.call(client, "invoke_function", call_body("record", task_id="inl", value=1))
    assert again["result"]["result"] == 1  # the gateway serves on


async def test_the_python_client_s_sync_calls_of_inline_functions_run_in_the_gateway(fast, client):
    """The SDK makes a SYNC call's id (so that an error can name it) and says it is new
    (`Spear-New-Execution-Id`): the gateway runs inline functions for it as for ids it makes. A
    chosen id without that is not run there (it may name an execution that exists)."""
    from spear import Client

    before = set(runs)
    async with Client(fast.settings.nats.urls, prefix=fast.settings.subject_prefix) as sdk:
        assert await sdk.invoke("inl", "record", value=5) == 5
    [execution_id] = set(runs) - before
    assert len(execution_id) == 26  # a ULID the SDK made
    started = [s.event for s in await fast.service.store.history(execution_id) if s.event.kind == "started"]
    assert [e.worker_id for e in started] == [fast.service.inline.worker_id]
    chosen = {**call_body("record", task_id="inl", value=6), "execution_id": "chosen-by-the-caller"}
    reply, _ = await fast.call(client, "invoke_function", chosen)
    assert reply["result"]["result"] == 6
    started = [s.event for s in await fast.service.store.history("chosen-by-the-caller") if s.event.kind == "started"]
    assert [e.worker_id for e in started] != [fast.service.inline.worker_id]  # a worker ran it


async def test_a_chain_stored_in_part_is_not_said_unstored(fast):
    """review62: on a replicated stream a gateway-run call's chain is stored one event at a time;
    with `requested` stored and `started` taken by nothing until its timeout, the reply said
    "the invocation was not stored: call again", and a caller doing so ran it again. It says
    the invocation may have been stored (it was: a worker runs it)."""
    from nats.js.api import StreamConfig

    store = fast.service.store
    await store.prepare_now()
    store._replicas = 3  # as on an R3 stream: the chain stored one by one (`_append_one_by_one`)
    js = fast.client.jetstream()
    config = (await js.stream_info(fast.names.stream)).config
    only_requested = [fast.names.append("*", "*", "requested")]  # (every later event: a 503)
    await js.update_stream(StreamConfig.from_response({**config.as_dict(), "subjects": only_requested}))
    try:
        reply = await _invoke(fast, call_body("record", task_id="inl", value=1))
    finally:
        await js.update_stream(config)
    assert reply["error_code"] == "UNAVAILABLE" and reply["execution_id"], reply
    assert "may have been stored" in reply["message"] and "was not stored" not in reply["message"], reply
    assert (await _kinds(fast, reply["execution_id"]))[:1] == ["requested"]
