"""A worker's quick first attempts (spear/worker/quick.py): an inline function's first delivery run
and stored from the read loop, with the usual path's events; whatever that path cannot settle
(a refused or unanswered chain, a function that logged) is stored the usual way, once."""

import asyncio
import contextvars
import json
import time
from contextlib import AsyncExitStack

import pytest

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import CancelRequested, Requested, encode_event
from spear.core.eventstore import StoreUnavailable
from spear.core.names import RAN_INLINE_HEADER
from spear.demo import demo
from spear.jetstream.pull import Delivery
from spear.jetstream.store import JetStreamStore
from spear.telemetry import tracing
from spear.worker.context import Context
from spear.worker.tasks import Task
from tests.conftest import call_body, has_status, held_messages, off_its_subjects, start_spear, until_registered

quick = Task("quick")
TERMINAL = (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED)
runs: dict[str, int] = {}


@quick.function(inline=True)
def counts(key: str) -> int:
    runs[key] = runs.get(key, 0) + 1
    return runs[key]


@quick.function(inline=True)
def flaky(key: str) -> str:
    runs[key] = runs.get(key, 0) + 1
    if runs[key] == 1:
        raise RuntimeError("the first attempt fails")
    return "second time lucky"


@quick.function(inline=True)
def chatty(key: str, ctx: Context) -> str:
    runs[key] = runs.get(key, 0) + 1
    ctx.log("one line")
    ctx.progress(0.5, "half way")
    return "said"


@quick.function(inline=True)
def exits(key: str) -> None:
    runs[key] = runs.get(key, 0) + 1
    raise SystemExit(3)


@quick.function(inline=True)
def cancels_itself(key: str) -> None:
    runs[key] = runs.get(key, 0) + 1
    raise asyncio.CancelledError("raised by the function, not a cancellation of anything")


where = contextvars.ContextVar("where", default="unset")


@quick.function(inline=True)
def sets_a_context_variable(key: str) -> str:
    where.set(key)
    return where.get()


@quick.function
def threaded(key: str) -> int:  # not inline: the usual path
    runs[key] = runs.get(key, 0) + 1
    return runs[key]


@quick.function(inline=True)
def stops(key: str) -> None:
    runs[key] = runs.get(key, 0) + 1
    raise StopIteration("out of items")


@quick.function
def slow(key: str) -> int:  # not inline: its `started` is stored before it is called
    runs[key] = runs.get(key, 0) + 1
    time.sleep(0.05)
    return runs[key]


@quick.function
def reads_a_context_variable() -> str:
    return where.get()


@pytest.fixture
async def running(settings):
    settings = with_overrides(settings, retry={"initial_backoff_ms": 20, "jitter": 0.0})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings, with_worker=False)
        spear.worker = await components.start_worker(stack, spear.nc, settings, [demo, quick])
        await until_registered(spear, "quick")
        yield spear


async def ended(spear, client, function: str, key: str) -> tuple[dict, list]:
    reply, _ = await spear.call(client, "invoke_function", call_body(function, "ASYNC", "quick", key=key))
    execution_id = reply["execution_id"]
    status, _ = await spear.status_until(client, execution_id, has_status(*TERMINAL))
    return status, await spear.service.store.history(execution_id)


async def test_an_inline_functions_first_attempt_is_run_and_stored_from_the_read_loop(running, client):
    worker = running.worker
    before = worker.quick.taken
    status, history = await ended(running, client, "counts", "plain")
    assert status["result"]["status"] == ExecutionStatus.COMPLETED and status["result"]["result"] == 1
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]
    requested, started, completed = (stored.event for stored in history)
    assert started.worker_id == worker.worker_id and started.attempt == completed.attempt == 1
    assert completed.result.started_at == started.at >= requested.at and completed.result.result == 1
    assert worker.quick.taken == before + 1 and runs["plain"] == 1
    # acknowledged: nothing of the task's consumer is pending or awaits an ack
    info = await client.jetstream().consumer_info(running.names.stream, running.names.worker_consumer("quick"))
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_its_events_continue_the_invocations_trace(running, client):
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    body = json.dumps(call_body("counts", "ASYNC", "quick", key="traced")).encode()
    msg = await client.request(running.names.api("invoke_function"), body, headers={"traceparent": parent})
    execution_id = json.loads(msg.data)["execution_id"]
    await running.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
    stream, names = running.names.stream, running.names
    traces = []
    for kind in ("requested", "started", "completed"):
        stored = await client.jetstream().get_last_msg(stream, names.event("quick", execution_id, kind))
        traces.append(stored.headers[tracing.TRACEPARENT].split("-")[1])
    assert traces == ["4bf92f3577b34da6a3ce929d0e0e4736"] * 3
    assert running.worker.quick.taken >= 1


async def test_a_trace_state_goes_on_as_on_the_usual_path(running, client):
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "vendor=x"}
    seen = {}
    for function in ("counts", "threaded"):  # the quick path, the usual one
        body = json.dumps(call_body(function, "ASYNC", "quick", key=f"state {function}")).encode()
        msg = await client.request(running.names.api("invoke_function"), body, headers=headers)
        execution_id = json.loads(msg.data)["execution_id"]
        await running.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
        for kind in ("requested", "started", "completed"):
            subject = running.names.event("quick", execution_id, kind)
            stored = await client.jetstream().get_last_msg(running.names.stream, subject)
            seen[function, kind] = (stored.headers["traceparent"][:35], stored.headers.get("tracestate"))
    assert running.worker.quick.taken == 1
    for kind in ("requested", "started", "completed"):
        assert seen["counts", kind] == seen["threaded", kind] == (headers["traceparent"][:35], "vendor=x")


async def test_a_retryable_failure_is_retried_after_its_backoff(running, client):
    status, history = await ended(running, client, "flaky", "flaky")
    assert status["result"]["status"] == ExecutionStatus.COMPLETED and status["result"]["result"] == "second time lucky"
    kinds = [stored.event.kind for stored in history]
    assert kinds == ["requested", "started", "retrying", "started", "completed"]
    assert runs["flaky"] == 2


async def test_an_attempt_that_logged_stores_its_lines_between_started_and_its_end(running, client):
    status, history = await ended(running, client, "chatty", "chatty")
    assert status["result"]["status"] == ExecutionStatus.COMPLETED and runs["chatty"] == 1
    assert [stored.event.kind for stored in history] == ["requested", "started", "log", "log", "completed"]
    seqs = [stored.seq for stored in history]
    assert seqs == sorted(seqs)
    started, line, progress, completed = (stored.event for stored in history[1:])
    assert (line.message, progress.progress, progress.message) == ("one line", 0.5, "half way")
    assert started.at <= line.at <= progress.at <= completed.at  # stamped when made, not when stored
    assert running.worker.quick.taken == 1


async def test_an_inline_function_raising_cancelled_error_fails_on_either_path(running, client):
    """A CancelledError an inline function raises cancels nothing: on the quick path (attempt 1)
    and the usual one (attempt 2) alike it is the function's failure. The usual path handed the
    invocation back for ever before."""
    body = {**call_body("cancels_itself", "ASYNC", "quick", key="cancels"), "context": {"max_retries": 1}}
    reply, _ = await running.call(client, "invoke_function", body)
    status, _ = await running.status_until(client, reply["execution_id"], has_status(*TERMINAL))
    assert (status["result"]["status"], status["result"]["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR")
    assert "CancelledError" in status["result"]["error_message"] and runs["cancels"] == 2
    history = await running.service.store.history(reply["execution_id"])
    assert [stored.event.kind for stored in history] == ["requested", "started", "retrying", "started", "failed"]


async def test_what_a_function_sets_in_context_variables_stays_with_it(running, client):
    _, history = await ended(running, client, "sets_a_context_variable", "mine")
    assert history[-1].event.result.result == "mine" and running.worker.quick.taken == 1
    reply, _ = await running.call(client, "invoke_function", call_body("reads_a_context_variable", "SYNC", "quick"))
    assert reply["result"]["result"] == "unset"


async def test_deliveries_are_asked_about_once_in_the_order_they_are_read(running, client):
    """Deliveries of one task taking either path, read together: none looks handed out again
    (asked in each one's task, a delivery read before one asked already did, and the worker
    planned every delivery with a read for 30 s: review17)."""
    body = json.dumps
    calls = []
    for n in range(30):
        calls.append(body(call_body("threaded", "ASYNC", "quick", key=f"t{n}")).encode())
        calls.append(body(call_body("counts", "ASYNC", "quick", key=f"c{n}")).encode())
    subject = running.names.api("invoke_function")
    replies = await asyncio.gather(*(client.request(subject, call, timeout=10) for call in calls))
    for reply in replies:
        await running.status_until(client, json.loads(reply.data)["execution_id"], has_status(*TERMINAL))
    worker = running.worker
    assert worker.quick.taken == 30  # every inline one ran quick
    assert worker._firsts._careful_until < time.monotonic()  # and the worker never turned careful


async def test_a_function_raising_system_exit_fails_only_itself(running, client):
    body = {**call_body("exits", "ASYNC", "quick", key="exits"), "context": {"max_retries": 0}}
    reply, _ = await running.call(client, "invoke_function", body)
    status, _ = await running.status_until(client, reply["execution_id"], has_status(*TERMINAL))
    assert (status["result"]["status"], status["result"]["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR")
    assert "SystemExit" in status["result"]["error_message"] and runs["exits"] == 1
    _, history = await ended(running, client, "counts", "after exits")  # the worker goes on
    assert history[-1].event.result.result == 1


async def test_other_calls_take_the_usual_path(running, client):
    before = running.worker.quick.taken
    status, history = await ended(running, client, "threaded", "threaded")
    assert status["result"]["result"] == 1
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]
    assert running.worker.quick.taken == before


async def crafted(spear, execution_id: str, *after: type, function: str = "counts") -> tuple[Delivery, int]:
    """A first delivery of an invocation stored now, with `after` (cancel requests) stored behind
    it; delivered by hand (its consumer is stopped: the test is its only deliverer)."""
    await spear.worker.consumers["quick"].stop()
    store = JetStreamStore(spear.nc, spear.names)
    request = Requested(
        execution_id=execution_id,
        task_id="quick",
        function_name=function,
        at="2026-12-01T00:00:00.000Z",
        execution_mode=ExecutionMode.ASYNC,
        parameters={"key": execution_id},
        timeout_ms=30_000,
    )
    seq = (await store.append(request, expect_last_seq=0)).seq
    last = seq
    for kind in after:
        event = kind(execution_id=execution_id, task_id="quick", function_name=function, at=request.at, attempt=0)
        last = (await store.append(event, expect_last_seq=last)).seq
    subject = spear.names.event("quick", execution_id, "requested")
    reply = f"$JS.ACK.{spear.names.stream}.nobody.1.{seq}.1.0.0"
    return Delivery(spear.nc, subject, reply, encode_event(request), b""), seq


class Slots:
    """Counts the consumer slots given back."""

    def __init__(self) -> None:
        self.freed = 0

    def done(self) -> None:
        self.freed += 1


async def test_a_chain_refused_for_a_cancel_request_ends_cancelled_once(running, client):
    delivery, _ = await crafted(running, "QCANCEL", CancelRequested)
    slots = Slots()
    assert running.worker.quick.take(delivery, slots, True)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=10)
    history = await running.service.store.history("QCANCEL")
    assert [stored.event.kind for stored in history] == ["requested", "cancel_requested", "cancelled"]
    assert runs["QCANCEL"] == 1 and slots.freed == 1 and delivery.acked


async def test_an_attempt_that_logged_meets_a_cancel_request_and_ends_cancelled(running, client, caplog):
    """Its `started` goes alone before its lines and is refused: planned again from the last
    event, as the usual path does (review17: it was handed back with an error, unsettled), and
    the dropped run is said in the log."""
    delivery, _ = await crafted(running, "QLOGGED", CancelRequested, function="chatty")
    slots = Slots()
    assert running.worker.quick.take(delivery, slots, True)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=10)
    history = await running.service.store.history("QLOGGED")
    assert [stored.event.kind for stored in history] == ["requested", "cancel_requested", "cancelled"]
    assert runs["QLOGGED"] == 1 and delivery.acked
    assert any("QLOGGED moved on before the start of attempt 1" in r.getMessage() for r in caplog.records)


async def test_a_chain_jetstream_did_not_take_is_stored_patiently_once(running, client):
    delivery, _ = await crafted(running, "QAWAY")
    config = await off_its_subjects(client, running.names)
    slots = Slots()
    try:
        assert running.worker.quick.take(delivery, slots, True)
        await asyncio.sleep(0.5)  # no responders meanwhile: the end waits, the delivery stays in hand
        assert slots.freed == 0 and not delivery.acked
    finally:
        await client.jetstream().update_stream(config)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=15)
    history = await running.service.store.history("QAWAY")
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]
    assert history[-1].event.result.result == 1 and runs["QAWAY"] == 1 and delivery.acked


async def test_a_delivery_handed_out_again_is_asked_about_once(running, client):
    worker = running.worker
    asked = []
    surely_first = worker._firsts.surely_first
    worker._firsts.surely_first = lambda *args: asked.append(args) or surely_first(*args)
    delivery, seq = await crafted(running, "QAGAIN")
    slots = Slots()
    worker._on_delivery(delivery, "quick", slots)  # first: run here
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=10)
    again = Delivery(running.nc, delivery.subject, delivery.reply, delivery.data, b"")
    worker._on_delivery(again, "quick", slots)  # the same one again, as a consumer that lost its state does
    await poll_until(lambda: asyncio.sleep(0, slots.freed == 2), bool, timeout_s=10)
    assert [args[1] for args in asked] == [seq, seq] and again.acked
    history = await running.service.store.history("QAGAIN")
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]
    assert runs["QAGAIN"] == 1  # planned from its last event: not run again


def delivery_of(spear, mode=ExecutionMode.ASYNC, delivered=1, block=b"", function="counts") -> Delivery:
    request = Requested(
        execution_id="QNOT",
        task_id="quick",
        function_name=function,
        at="2026-12-01T00:00:00.000Z",
        execution_mode=mode,
        parameters={"key": "QNOT"},
    )
    reply = f"$JS.ACK.{spear.names.stream}.nobody.{delivered}.99999.1.0.0"
    return Delivery(spear.nc, spear.names.event("quick", "QNOT", "requested"), reply, encode_event(request), block)


@pytest.mark.parametrize(
    "why",
    ["not surely first", "redelivered", "streamed", "run by a gateway", "not inline", "store full", "stopping", "held"],
)
async def test_what_the_quick_path_leaves_to_the_usual_one(running, why):
    worker = running.worker
    delivery, first = delivery_of(running), True
    if why == "not surely first":
        first = False
    elif why == "redelivered":
        delivery = delivery_of(running, delivered=2)
    elif why == "streamed":
        delivery = delivery_of(running, mode=ExecutionMode.STREAM)
    elif why == "run by a gateway":
        delivery = delivery_of(running, block=b"NATS/1.0\r\n" + RAN_INLINE_HEADER.encode() + b": 1\r\n\r\n")
    elif why == "not inline":
        delivery = delivery_of(running, function="threaded")
    elif why == "store full":
        worker.store.full_at = time.monotonic()
    elif why == "held":
        worker.holding.add("QNOT")  # its end being stored here already
    else:
        worker._stopped = True
    assert not worker.quick.take(delivery, Slots(), first)
    assert worker.quick.taken == 0 and "QNOT" not in runs and not delivery.acked
    worker._stopped = False


async def test_on_a_replicated_stream_a_quick_attempt_is_stored_one_event_at_a_time(running, client):
    running.worker.quick.store._replicas = 3  # as the store finds a replicated stream: no chain without a wait
    status, history = await ended(running, client, "counts", "replicated")
    assert status["result"]["result"] == 1 and running.worker.quick.taken == 1
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]


async def test_an_attempt_that_logged_waits_out_an_outage_before_its_started(running, client):
    """Its `started` goes alone, before its lines: stored as patiently as its end, not given up
    with the outcome (probe22: the function ran again, unseen in the history)."""
    delivery, _ = await crafted(running, "QLOGAWAY", function="chatty")
    config = await off_its_subjects(client, running.names)
    slots = Slots()
    try:
        assert running.worker.quick.take(delivery, slots, True)
        await asyncio.sleep(0.5)
        assert slots.freed == 0 and not delivery.acked
    finally:
        await client.jetstream().update_stream(config)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=15)
    history = await running.service.store.history("QLOGAWAY")
    assert [stored.event.kind for stored in history] == ["requested", "started", "log", "log", "completed"]
    assert runs["QLOGAWAY"] == 1 and delivery.acked


async def test_a_started_stored_whose_answer_was_lost_is_found_when_asked_again(running, client):
    store = running.worker.store
    real_append, lost = store.append, []

    async def loses_the_first_answer(event, **kwargs):
        appended = await real_append(event, **kwargs)
        if event.kind == "started" and not lost:
            lost.append(appended)
            raise StoreUnavailable("JetStream did not store the event: TimeoutError")  # (it did)
        return appended

    store.append = loses_the_first_answer
    delivery, _ = await crafted(running, "QLOSTACK", function="chatty")
    slots = Slots()
    assert running.worker.quick.take(delivery, slots, True)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=15)
    history = await running.service.store.history("QLOSTACK")
    assert [stored.event.kind for stored in history] == ["requested", "started", "log", "log", "completed"]
    assert history[1].seq == lost[0].seq and runs["QLOSTACK"] == 1 and delivery.acked


async def test_a_stop_iteration_is_the_same_failure_on_either_path(running, client):
    body = {**call_body("stops", "ASYNC", "quick", key="stops"), "context": {"max_retries": 1}}
    reply, _ = await running.call(client, "invoke_function", body)
    await running.status_until(client, reply["execution_id"], has_status(*TERMINAL))
    history = await running.service.store.history(reply["execution_id"])
    retrying, failed = history[2].event, history[-1].event  # attempt 1 quick, attempt 2 the usual way
    assert [stored.event.kind for stored in history] == ["requested", "started", "retrying", "started", "failed"]
    assert retrying.result.error_message == failed.result.error_message == "StopIteration: out of items"


@pytest.mark.parametrize("stored", [False, True], ids=["not_stored", "stored_answer_lost"])
async def test_a_started_that_meets_an_outage_is_stored_patiently_before_the_call(running, client, stored):
    """`started` comes before the call of a function that is not inline (probe42). One that meets
    an outage is tried again, with the function not called meanwhile; one stored whose answer was
    lost is found stored (review44: handed back, its redelivery found `started` alone and ended
    the execution WORKER_LOST, the function never run)."""
    store = running.worker.store
    real_append, refused = store.append, []

    async def away_once(event, **kwargs):
        if event.kind == "started" and not refused:
            refused.append(event)
            if stored:
                await real_append(event, **kwargs)
            raise StoreUnavailable("JetStream did not store the event: TimeoutError")
        return await real_append(event, **kwargs)

    store.append = away_once
    execution_id = f"QSLOW{int(stored)}"
    delivery, _ = await crafted(running, execution_id, function="slow")
    answers = await client.subscribe(delivery.reply)
    await client.flush()
    slots = Slots()
    running.worker._on_delivery(delivery, "quick", slots)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=15)
    history = await running.service.store.history(execution_id)
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]
    assert refused and runs[execution_id] == 1 and history[-1].event.result.result == 1
    said = [msg.data async for msg in held_messages(answers)]
    assert said and said[-1] == b"+ACK" and not [a for a in said if a.startswith(b"-NAK")], said


async def test_an_attempt_that_logged_follows_junk_stored_before_its_start(running, client):
    """Junk changes no plan: `started` follows it, as an end does (review18: the function ran again)."""
    delivery, _ = await crafted(running, "QJUNK", function="chatty")
    # (asked, not just published: the stream stores what is published in its own time, and junk
    # stored after `started` would be another case, one that ends the attempt's writing)
    await client.request(f"{running.names.prefix}.append.quick.QJUNK.junk", b"not an event", timeout=5)
    slots = Slots()
    assert running.worker.quick.take(delivery, slots, True)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=10)
    history = await running.service.store.history("QJUNK")  # (the junk is left out of it)
    assert [stored.event.kind for stored in history] == ["requested", "started", "log", "log", "completed"]
    assert runs["QJUNK"] == 1 and delivery.acked


async def test_a_delivery_whose_ack_subject_cannot_be_read_is_handed_on_not_raised(running):
    slots = Slots()
    junk = Delivery(running.nc, running.names.event("quick", "QACK", "requested"), "$JS.ACK.a.b.c.d.e.f.g", b"{}", b"")
    running.worker._on_delivery(junk, "quick", slots)  # raised out of the read loop's callback before
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=10)


async def test_an_invocation_handed_out_again_while_its_end_is_stored_is_not_run_again(running, client):
    """A nats-server that restarts without its consumer's record of a delivery hands it out again
    while the worker still stores the end of the attempt it ran (probe23): the worker hands it
    back for later instead of running it a second time, unseen."""
    delivery, seq = await crafted(running, "QHELD")
    config = await off_its_subjects(client, running.names)
    slots, again_slots = Slots(), Slots()
    try:
        running.worker._on_delivery(delivery, "quick", slots)  # run quick; its chain finds no stream
        await asyncio.sleep(0.3)
        assert "QHELD" in running.worker.holding and running.worker.quick.taken == 1
        reply = f"$JS.ACK.{running.names.stream}.nobody.1.{seq}.2.0.0"  # the same message, a new delivery
        again = Delivery(running.nc, delivery.subject, reply, delivery.data, b"")
        running.worker._on_delivery(again, "quick", again_slots)
        await poll_until(lambda: asyncio.sleep(0, again_slots.freed), bool, timeout_s=10)
        assert again.acked and runs["QHELD"] == 1  # handed back, not run
    finally:
        await client.jetstream().update_stream(config)
    await poll_until(lambda: asyncio.sleep(0, slots.freed), bool, timeout_s=15)
    history = await running.service.store.history("QHELD")
    assert [stored.event.kind for stored in history] == ["requested", "started", "completed"]
    assert runs["QHELD"] == 1 and delivery.acked and "QHELD" not in running.worker.holding


@pytest.mark.parametrize("poison_after", [1, 2])
async def test_a_quick_attempt_that_cannot_describe_its_outcome_counts_towards_poison(settings, client, poison_after):
    """A quick attempt whose outcome could not be described (a bug) was handed back without being
    counted, so poisoning took one delivery more than `poison_after`."""
    tuned = with_overrides(settings, worker={"poison_after": poison_after})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, tuned, with_worker=False)
        spear.worker = await components.start_worker(stack, spear.nc, tuned, [demo, quick])
        await until_registered(spear, "quick")
        asked: list[int] = []

        def broken() -> int:  # what an attempt's outcome is described with, failing: a bug
            asked.append(1)
            raise RuntimeError("worker code is broken")

        spear.worker.max_result_size = broken  # type: ignore[method-assign]
        before = spear.worker.quick.taken
        status, history = await ended(spear, client, "counts", "broken")
        assert spear.worker.quick.taken == before + 1  # the first delivery went the quick way
        assert status["result"]["error_code"] == "POISON_MESSAGE", status
        assert f"{poison_after} deliveries failed" in status["result"]["error_message"]
        assert len(asked) == poison_after  # the quick one counted: not one more
        assert [stored.event.kind for stored in history] == ["requested", "failed"]
