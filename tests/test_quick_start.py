"""Quick attempts: an inline function's `started` and its end are sent back to back (the end fenced
on `started` being the stream's newest message); any other function has `started` stored before
it is called, so a cancel of a pending execution keeps it from running. Fencing, cancellation and
redelivery hold either way. Real server."""

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import NamedTuple

import msgspec
import nats
import pytest
import pytest_asyncio

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import TERMINAL_STATUSES, ExecutionMode, ExecutionStatus
from spear.core.events import (
    Cancelled,
    CancelRequested,
    Completed,
    Event,
    Logged,
    Requested,
    Started,
    StoredResult,
    envelope,
    is_terminal,
)
from spear.core.eventstore import AppendConflict
from spear.core.memstore import MemoryEventStore
from spear.demo import demo
from spear.jetstream import topology
from spear.jetstream.store import JetStreamStore
from spear.worker.context import Context
from spear.worker.tasks import Task
from tests.conftest import Spear, call_body, has_status, invoke_body, start_spear, until_registered

quick = Task(task_id="quick", description="functions whose timing the tests control")
HOOKS: dict[str, Callable[[Context], Awaitable[None]]] = {}
RUNS: list[str] = []


@quick.function
async def hooked(ctx: Context) -> str:
    """Runs the test's hook, then returns."""
    RUNS.append(ctx.execution_id)
    await HOOKS["run"](ctx)
    return "done"


@quick.function(inline=True)
def hooked_inline(ctx: Context) -> str:
    """Runs the test's hook (on the worker's loop: it cannot await), then returns."""
    RUNS.append(ctx.execution_id)
    INLINE_HOOKS["run"](ctx)
    return "done"


INLINE_HOOKS: dict[str, Callable[[Context], None]] = {}


@quick.function
async def streams(ctx: Context):
    """Yields one item, then runs the test's hook."""
    yield "first"
    await HOOKS["run"](ctx)


@pytest_asyncio.fixture
async def spear_quick(settings):
    tuned = with_overrides(settings, worker={"ack_wait_ms": 1000})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, tuned, [demo, quick])
        await until_registered(running, "quick")
        yield running
    HOOKS.clear()
    INLINE_HOOKS.clear()
    RUNS.clear()


async def _history(spear: Spear, execution_id: str):
    return await spear.service.store.history(execution_id)


async def _headers(spear: Spear, seq: int) -> dict[str, str]:
    reply = await spear.nc.request(f"$JS.API.DIRECT.GET.{spear.names.stream}", json.dumps({"seq": seq}).encode())
    return reply.headers or {}


async def _ended(spear: Spear, client, execution_id: str) -> dict:
    reply, _ = await spear.status_until(client, execution_id, has_status(*TERMINAL_STATUSES))
    return reply


async def test_a_quick_function_stores_started_and_its_end_back_to_back(spear_quick, client):
    spear = spear_quick
    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="hi"))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED and reply["result"]["result"] == "hi"
    history = await _history(spear, reply["execution_id"])
    assert [s.event.kind for s in history] == ["requested", "started", "completed"]
    _, started, completed = history
    assert isinstance(started.event, Started) and isinstance(completed.event, Completed)
    assert started.event.attempt == completed.event.attempt == completed.event.result.attempt == 1
    assert started.event.at == completed.event.result.started_at <= completed.event.at  # when it began
    # the end went out before `started` was acknowledged, fenced on it being the newest message
    started_id = (await _headers(spear, started.seq))["Nats-Msg-Id"]
    assert (await _headers(spear, completed.seq))["Nats-Expected-Last-Msg-Id"] == started_id
    assert completed.seq == started.seq + 1


async def test_a_slow_function_is_running_with_started_stored_before_it_ends(spear_quick, client):
    spear = spear_quick
    release = asyncio.Event()

    async def wait(ctx: Context) -> None:
        await release.wait()

    HOOKS["run"] = wait
    accepted, _ = await spear.call(client, "invoke_function", call_body("hooked", "ASYNC", task_id="quick"))
    execution_id = accepted["execution_id"]
    await spear.status_until(client, execution_id, has_status(ExecutionStatus.RUNNING))
    assert [s.event.kind for s in await _history(spear, execution_id)] == ["requested", "started"]
    release.set()
    assert (await _ended(spear, client, execution_id))["result"]["status"] == ExecutionStatus.COMPLETED
    history = await _history(spear, execution_id)
    assert [s.event.kind for s in history] == ["requested", "started", "completed"]
    headers = await _headers(spear, history[2].seq)  # fenced on `started`'s sequence, as always
    assert headers["Nats-Expected-Last-Subject-Sequence"] == str(history[1].seq)
    assert "Nats-Expected-Last-Msg-Id" not in headers


async def test_a_first_chunk_is_stored_at_once_with_started_before_it(spear_quick, client):
    spear = spear_quick
    release = asyncio.Event()

    async def wait(ctx: Context) -> None:
        await release.wait()

    HOOKS["run"] = wait
    accepted, _ = await spear.call(client, "invoke_function", call_body("streams", "STREAM", task_id="quick"))
    execution_id = accepted["execution_id"]

    async def kinds() -> list[str]:
        return [s.event.kind for s in await _history(spear, execution_id)]

    stored = await poll_until(kinds, lambda k: "chunk" in k, timeout_s=10, interval_s=0.01, what="first chunk")
    assert stored == ["requested", "started", "chunk"]  # while the generator still runs
    release.set()
    assert (await _ended(spear, client, execution_id))["result"]["result"] == ["first"]
    assert await kinds() == ["requested", "started", "chunk", "completed"]


async def test_a_function_that_is_not_inline_is_called_once_its_started_is_stored(spear_quick, client):
    """probe42: cancels sent right after the invocation found it pending and stored `cancelled`,
    and the function ran anyway (40 of 40), called before its `started` was stored: the history
    said it never started. `started`, fenced on `requested`, is now stored before the call: a
    cancel stored first refuses it, and the function is not called."""
    spear = spear_quick
    seen: list[list[str]] = []

    async def look(ctx: Context) -> None:
        seen.append([s.event.kind for s in await _history(spear, ctx.execution_id)])

    HOOKS["run"] = look
    reply, _ = await spear.call(client, "invoke_function", call_body("hooked", task_id="quick"))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED, reply
    assert seen == [["requested", "started"]]  # (a quick first delivery, as the probe's)


@pytest.mark.parametrize("kind", ["cancelled", "cancel_requested"])
async def test_a_cancel_stored_while_an_inline_quick_attempt_runs_wins(spear_quick, client, nats_url, kind):
    """An inline function runs before its `started` is stored (declared quick and free of side
    effects). A cancel stored meanwhile (`cancelled`, or an older gateway's `cancel_requested`)
    refuses the pair: the execution ends CANCELLED, once, and the result is discarded."""
    spear = spear_quick

    def cancel(ctx: Context) -> None:  # on the worker's loop, which it blocks: from another thread
        async def store() -> None:
            nc = await nats.connect(nats_url)
            try:
                other = JetStreamStore(nc, spear.names)
                requested = await other.last(ctx.execution_id)
                assert requested is not None and requested.event.kind == "requested"
                if kind == "cancelled":
                    result = StoredResult(status=ExecutionStatus.CANCELLED, error_code="CANCELLED", attempt=0)
                    event: Event = Cancelled(**envelope(requested.event, 0), result=result, reason="from the test")
                else:
                    event = CancelRequested(**envelope(requested.event, 1), reason="from the test")
                await other.append(event, expect_last_seq=requested.seq)
            finally:
                await nc.close()

        worker = threading.Thread(target=asyncio.run, args=(store(),))
        worker.start()
        worker.join(10)

    INLINE_HOOKS["run"] = cancel
    accepted, _ = await spear.call(client, "invoke_function", call_body("hooked_inline", "ASYNC", task_id="quick"))
    execution_id = accepted["execution_id"]
    reply = await _ended(spear, client, execution_id)
    assert reply["result"]["status"] == ExecutionStatus.CANCELLED
    assert [execution_id] == RUNS
    kinds = [s.event.kind for s in await _history(spear, execution_id)]
    assert kinds == (["requested", "cancelled"] if kind == "cancelled" else ["requested", kind, "cancelled"])
    await _settled(spear)  # acknowledged: not delivered again
    assert [execution_id] == RUNS
    assert [s.event.kind for s in await _history(spear, execution_id)] == kinds


async def test_a_redelivery_after_a_crash_past_the_quick_end_does_not_complete_again(settings, client):
    """A worker stored `started` and `completed` as a quick attempt does, then died before its
    acknowledgement: the invocation comes again, and the next worker only acknowledges it."""
    tuned = with_overrides(settings, worker={"ack_wait_ms": 300})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, tuned, with_worker=False)
        registry = await spear.nc.jetstream().key_value(spear.names.tasks_bucket)
        await registry.put("quick", msgspec.json.encode(quick.info()))  # what a worker does first
        await until_registered(spear, "quick")
        accepted, _ = await spear.call(client, "invoke_function", call_body("hooked", "ASYNC", task_id="quick"))
        execution_id = accepted["execution_id"]
        # the worker that dies: takes the invocation, stores both events, never acknowledges
        durable = await topology.ensure_worker_consumer(spear.nc, spear.names, "quick", 300)
        pull = await spear.nc.jetstream().pull_subscribe_bind(durable, stream=spear.names.stream)
        (delivery,) = await pull.fetch(1, timeout=5)
        requested = await spear.service.store.last(execution_id)
        assert requested.seq == delivery.metadata.sequence.stream
        started = Started(**envelope(requested.event, 1), worker_id="the-one-that-died")
        started_id = f"{execution_id}:started:1:{requested.seq}"
        result = StoredResult(status=ExecutionStatus.COMPLETED, result="done", attempt=1)
        end = Completed(**envelope(requested.event, 1), result=result)
        await spear.service.store.append_chain([started, end], expect_last_seq=requested.seq, msg_ids=[started_id, ""])
        await pull.unsubscribe()
        # a live worker gets the invocation again
        spear.worker = await components.start_worker(stack, spear.nc, tuned, [quick])
        info = await _settled(spear)
        assert info.delivered.consumer_seq >= 2  # it was delivered again, and acknowledged
        assert RUNS == []  # and the function did not run again
        history = await spear.service.store.history(execution_id)
        assert [s.event.kind for s in history] == ["requested", "started", "completed"]
        assert sum(is_terminal(s.event) for s in history) == 1


async def _settled(spear: Spear, task_id: str = "quick"):
    """Until the task's consumer has nothing pending or unacknowledged; its info."""
    js = spear.nc.jetstream()
    consumer = spear.names.worker_consumer(task_id)
    return await poll_until(
        lambda: js.consumer_info(spear.names.stream, consumer),
        lambda info: info.num_ack_pending == 0 and info.num_pending == 0,
        timeout_s=10,
        interval_s=0.02,
        what=f"consumer {consumer} settled",
    )


@pytest.mark.parametrize("store_kind", ["jetstream", "memory"])
async def test_a_chain_end_is_stored_only_right_behind_its_predecessor(spear_quick, store_kind):
    """The fence a quick attempt's end relies on, on both stores: refused when its predecessor was
    refused, or when any other message was stored between them."""
    store = spear_quick.service.store if store_kind == "jetstream" else MemoryEventStore()
    requested = Requested(**envelope(_Named("q1"), 0), execution_mode=ExecutionMode.ASYNC)
    seq = (await store.append(requested, expect_last_seq=0)).seq
    started = Started(**envelope(requested, 1))
    end = Completed(**envelope(requested, 1), result=StoredResult(status=ExecutionStatus.COMPLETED, attempt=1))
    with pytest.raises(AppendConflict):  # `started` refused (a stale fence): nothing is stored
        await store.append_chain([started, end], expect_last_seq=seq + 100, msg_ids=["q1:s:a", ""])
    assert [s.event.kind for s in await store.history("q1")] == ["requested"]
    other = Requested(**envelope(_Named("q2"), 0), execution_mode=ExecutionMode.ASYNC)
    await store.append(started, expect_last_seq=seq, msg_id="q1:s:b")
    await store.append(other, expect_last_seq=0)  # another execution's event gets in between
    with pytest.raises(AppendConflict):
        await store.append(end, expect_last_msg_id="q1:s:b")
    appended = await store.append_chain(
        [Logged(**envelope(requested, 1), message="m"), end], expect_last_seq=seq + 1, msg_ids=["q1:l", "q1:end"]
    )
    history = await store.history("q1")
    assert [s.event.kind for s in history] == ["requested", "started", "log", "completed"]
    assert history[-1].seq == appended.seq and history[-2].seq == appended.seq - 1


class _Named(NamedTuple):
    execution_id: str
    task_id: str = "unserved"  # no worker takes these invocations
    function_name: str = "f"
