"""The ASYNC queue's bookkeeping in the gateway (`Admission`) through what review20 found: a
stream made anew, callers that leave, figures that cannot be read, failing reads of another
task, and tasks no longer called."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from contextlib import AsyncExitStack

import msgspec
import pytest

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import load_settings, with_overrides
from spear.core.contract import InvokeFunctionRequest
from spear.demo import demo
from spear.jetstream import counting, topology
from spear.jetstream.embedded import EmbeddedNats
from tests.conftest import Spear, counted_direct_gets, invoke_body, start_spear, start_undrained, until_registered
from tests.processes import free_port


async def _drained(js, stream: str, consumer: str) -> bool:
    info = await js.consumer_info(stream, consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_stream_made_anew_does_not_leave_the_queue_full_for_ever(settings, client):
    """Stream sequences restart from 1 when the stream is made anew (nats-server lost its store;
    a worker starting makes it again): the sequences kept from before are dropped, not left to
    refuse the task for good with its queue empty."""
    tuned = with_overrides(settings, async_execution={"max_queue_size": 3})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        for n in range(10):  # sequences go up a little
            done, _ = await running.call(client, "invoke_function", invoke_body("echo", value=n))
            assert done["success"] is True
        await running.worker.stop()
        accepted, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=1))
        assert accepted["success"] is True
        admission = running.service.admission
        assert list(admission._undelivered["demo"])  # (kept: no worker took it)
        # the store is lost and made anew (what a restarted nats-server without its data, then a
        # worker's start-up, do)
        js = client.jetstream()
        await js.delete_stream(running.names.stream)
        await topology.ensure_base(client, running.names)
        await components.start_worker(stack, running.nc, running.settings, [demo])
        consumer = running.names.worker_consumer("demo")
        refused = []
        for n in range(6):  # each drained before the next: never more than 1 waits
            reply, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=n))
            if not reply["success"]:
                refused.append(reply["error_code"])
            await poll_until(lambda: _drained(js, running.names.stream, consumer), bool, timeout_s=10)
            await asyncio.sleep(0.15)  # past the cached reading
        assert refused == [], refused


async def test_an_async_call_cancelled_while_its_append_is_unanswered_keeps_counting(tmp_path):
    """The HTTP adapter cancels `invoke` when the client leaves (`until_client_leaves`). A call
    cancelled while its append waits for a frozen nats-server counts as unanswered, not as not
    stored: nats-py sends it once the server goes on, so the queue must not take one more for
    each caller that gave up."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = server.start()
    tuned = with_overrides(load_settings(), nats={"urls": [url]}, async_execution={"max_queue_size": 3})
    try:
        async with AsyncExitStack() as stack:
            running = await start_spear(stack, tuned)
            await until_registered(running, "demo")
            await running.worker.stop()
            service = running.service
            request = msgspec.json.decode(json.dumps(invoke_body("echo", "ASYNC", value=7)), type=InvokeFunctionRequest)
            assert (await service.invoke(request)).success  # 1 waits; the queue figure is read
            process = server.process
            process.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(0.2)
                admitted = 0
                for _ in range(8):  # clients that give up after 0.3 s, one after the other
                    call = asyncio.ensure_future(service.invoke(request))
                    await asyncio.sleep(0.3)
                    if not call.done():
                        admitted += 1
                        call.cancel()
                        await asyncio.gather(call, return_exceptions=True)
                held = service.admission._held("demo")
            finally:
                process.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.0)
            stored = await counting.count_matching(
                running.nc, running.names.stream, running.names.event("demo", "*", "requested"), timeout=2
            )
            assert stored <= 3, (admitted, held, stored)
    finally:
        server.stop()


@pytest.mark.parametrize("subject_only", [False, True], ids=["whole stream", "task's requested"])
async def test_a_full_queue_purged_by_an_operator_takes_calls_again(settings, client, subject_only):
    """An operator drops a task's backlog (`nats stream purge`, whole or by subject): nats-server
    moves the consumer past it, so the sequences accepted here no longer count."""
    from tests.conftest import start_undrained

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        for n in range(3):
            accepted, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=n))
            assert accepted["success"] is True
        js = client.jetstream()
        if subject_only:
            await js.purge_stream(running.names.stream, subject=running.names.event("demo", "*", "requested"))
        else:
            await js.purge_stream(running.names.stream)
        await asyncio.sleep(0.3)
        reply, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=9))
        assert reply["success"] is True, reply


async def test_an_async_invocation_stored_is_not_answered_with_an_error_by_its_estimate(settings, monkeypatch):
    """`invoke` stores the event, counts it, then reads the function's stats for the estimate
    (a KV read of another stream): should that read fail, the stored invocation is still
    answered as accepted (with the fallback estimate), not with an error after which a client
    retrying without an id would make a second one."""
    import nats.errors

    from spear.service import operations

    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        await until_registered(running, "demo")
        await running.worker.stop()
        service = running.service

        async def kv_down(kv, key):
            raise nats.errors.TimeoutError()

        monkeypatch.setattr(operations, "read_function_stats", kv_down)
        request = msgspec.json.decode(json.dumps(invoke_body("echo", "ASYNC", value=7)), type=InvokeFunctionRequest)
        outcome: object
        try:
            outcome = await service.invoke(request)
        except Exception as exc:
            outcome = exc
        stored = await counting.count_matching(
            running.nc, running.names.stream, running.names.event("demo", "*", "requested"), timeout=2
        )
        assert stored == 1
        assert not isinstance(outcome, Exception), outcome
        assert outcome.success and outcome.estimated_completion_ms >= 1


async def test_one_tasks_failing_reads_do_not_keep_anothers_unanswered_appends_counted(settings, monkeypatch):
    """Reads of task "other" failing (simulated here: say its consumer's leader is being
    elected) do not keep `demo`'s unanswered appends counted for ever once `demo`'s own reads
    succeed."""
    from tests.conftest import start_undrained

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        admission = running.service.admission
        await admission.check_queue("demo")
        real_count = admission._count

        async def count(task_id, cancellations):
            if task_id == "other":
                raise TimeoutError("simulated")
            return await real_count(task_id, cancellations)

        monkeypatch.setattr(admission, "_count", count)
        for n in range(3):
            admission.hold("demo", f"unanswered-{n}")
            admission.release("demo", f"unanswered-{n}", None, unanswered=True)
        end = time.monotonic() + 3 * 1.0
        while time.monotonic() < end:  # /metrics scrapes, or calls of task "other"
            admission._reads.start("other", lambda: admission._read("other", time.monotonic()))
            await asyncio.sleep(0.1)
            try:
                await admission.check_queue("demo")
                break
            except Exception:
                pass
        assert admission.queue_open_now("demo"), list(admission._uncertain["demo"])


async def test_calls_under_one_id_count_once_also_when_the_queue_has_one_slot(settings, client):
    """Calls under one id count once: with one slot left, a client's retries of one invocation
    sent together (which add nothing) are not refused RESOURCE_EXHAUSTED while the first is on
    its way."""
    from tests.conftest import start_undrained

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        for n in range(2):
            accepted, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=n))
            assert accepted["success"] is True
        subject = running.names.api("invoke_function")
        same = json.dumps({**invoke_body("echo", "ASYNC", value=1), "execution_id": "last-slot"}).encode()
        replies = [
            json.loads(r.data)
            for r in await asyncio.gather(*(client.request(subject, same, timeout=10) for _ in range(20)))
        ]
        codes = [r.get("error_code", "") for r in replies]
        assert set(codes) == {""}, codes


async def test_tasks_no_longer_called_are_forgotten(settings, monkeypatch):
    """What the gateway keeps per task (its queue figure, sequences, failures) is dropped once the
    task has not been read for a while with nothing counted: not an entry per task ever called.
    A task with invocations still waiting is kept."""
    from spear.service import admission as admission_module
    from tests.conftest import start_undrained

    monkeypatch.setattr(admission_module, "IDLE_FORGET_S", 0.5)
    monkeypatch.setattr(admission_module, "SWEEP_S", 0.2)
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        admission = running.service.admission
        accepted = await running.service.invoke(
            msgspec.json.decode(json.dumps(invoke_body("echo", "ASYNC", value=1)), type=InvokeFunctionRequest)
        )
        assert accepted.success  # demo: one waits, no worker takes it
        for n in range(20):
            await admission.check_queue(f"idle-{n}")
        assert {f"idle-{n}" for n in range(20)} <= set(admission._queues)
        await asyncio.sleep(0.6)
        await admission.depth("busy", max_age_s=0)  # a read of another task sweeps
        assert not {f"idle-{n}" for n in range(20)} & set(admission._queues)
        assert "demo" in admission._queues and list(admission._undelivered["demo"])
        await admission.check_queue("idle-0")  # a forgotten task is read again when called
        assert "idle-0" in admission._queues


@pytest.mark.parametrize("consumer", [True, False], ids=["its consumer", "no consumer yet"])
async def test_invocations_cancelled_while_they_wait_make_room_in_the_queue(settings, client, consumer):
    """probe29: an operator cancels a backlog to make room, and new calls were refused until a
    worker had passed the cancelled invocations (all of them still undelivered in the stream)."""
    from tests.conftest import has_status, start_undrained

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        if not consumer:  # (as before any worker served the task: nats-server counts what is stored)
            await client.jetstream().delete_consumer(running.names.stream, running.names.worker_consumer("demo"))

        async def call(n: int) -> dict:
            reply, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=n))
            return reply

        waiting = [(await call(n))["execution_id"] for n in range(3)]
        assert (await call(3))["error_code"] == "RESOURCE_EXHAUSTED"
        for execution_id in waiting[:2]:
            cancelled, _ = await running.call(client, "cancel_execution", {"execution_id": execution_id})
            assert cancelled["success"] is True, cancelled
        await asyncio.sleep(0.15)  # (past the figure at hand)
        more = [await call(n) for n in (4, 5, 6)]
        assert [reply["success"] for reply in more] == [True, True, False], more  # room for two, no more
        assert more[2]["error_code"] == "RESOURCE_EXHAUSTED"
        await components.start_worker(stack, running.nc, running.settings, [demo])
        for execution_id in [waiting[2], *(reply["execution_id"] for reply in more[:2])]:
            await running.status_until(client, execution_id, has_status("EXECUTION_STATUS_COMPLETED"))
        for execution_id in waiting[:2]:  # (never started: passed by the worker)
            history = await running.service.store.history(execution_id)
            assert [stored.event.kind for stored in history] == ["requested", "cancelled"]


async def _async_call(running: Spear, client, n: int) -> dict:
    reply, _ = await running.call(client, "invoke_function", invoke_body("echo", "ASYNC", value=n))
    return reply


async def _submitted_and_cancelled(running: Spear, client, count: int) -> None:
    """`count` ASYNC calls, each cancelled once accepted."""
    for n in range(count):
        execution_id = (await _async_call(running, client, n))["execution_id"]
        cancelled, _ = await running.call(client, "cancel_execution", {"execution_id": execution_id})
        assert cancelled["success"] is True, cancelled


async def _read_per_refusal(running: Spear, client, monkeypatch, refusals: int = 10) -> tuple[float, int]:
    """The stored messages each of `refusals` refused calls read (what is kept of cancellations,
    300 in these tests, is checked against the log at most once a second), and the requests."""
    read = counted_direct_gets(monkeypatch, len)
    for n in range(refusals):
        assert (await _async_call(running, client, 100 + n))["error_code"] == "RESOURCE_EXHAUSTED"
        await asyncio.sleep(0.03)  # (past FRESH_S: each refusal of a busy gateway reads anew)
    return sum(read) / refusals, len(read)


async def test_cancellations_kept_from_a_stream_made_anew_do_not_let_calls_past_the_limit(settings, client):
    """review27: the cancelled sequences kept of a stream made anew were subtracted from the new
    stream's count by every read between refusals, and invocations stored by others (another
    gateway) were let in past `max_queue_size`."""
    import json as _json

    import msgspec

    from spear.core.contract import InvokeFunctionRequest
    from spear.jetstream import counting, topology
    from tests.conftest import start_spear, until_registered

    tuned = with_overrides(settings, async_execution={"max_queue_size": 3})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        await running.worker.stop()
        admission = running.service.admission
        waiting = [(await _async_call(running, client, n))["execution_id"] for n in range(3)]
        for execution_id in waiting[:2]:
            cancelled, _ = await running.call(client, "cancel_execution", {"execution_id": execution_id})
            assert cancelled["success"] is True, cancelled
        await asyncio.sleep(0.15)
        assert (await _async_call(running, client, 3))["success"] is True  # room made by the cancels
        assert len(admission._cancelled.sequences("demo", 0)) == 2  # (the refusing read's set, kept)
        # the store is lost and made anew (test_a_stream_made_anew_does_not_leave_the_queue_full_for_ever)
        await client.jetstream().delete_stream(running.names.stream)
        await topology.ensure_base(client, running.names)
        # another gateway fills the task's queue of the new stream (3 of 3)
        other = await components.start_service(stack, running.nc, tuned)
        for n in range(3):
            request = msgspec.json.decode(
                _json.dumps(invoke_body("echo", "ASYNC", value=10 + n)), type=InvokeFunctionRequest
            )
            assert (await other.invoke(request)).success
        await admission.depth_within("demo", 0.0)  # (a /metrics scrape: the figure read now)
        extra = await _async_call(running, client, 20)
        stored = await counting.count_matching(
            running.nc, running.names.stream, running.names.event("demo", "*", "requested"), timeout=2
        )
        assert extra.get("error_code") == "RESOURCE_EXHAUSTED", (extra, f"{stored} stored, the limit is 3")


async def test_a_refusal_reads_only_the_cancellations_stored_since_the_last(settings, client, monkeypatch):
    """review27: each read on the refusing path read every `cancelled` stored after the consumer's
    last delivery, then the `requested` of each, again at every refusal (a full queue under load
    refuses many: one such read per FRESH_S): with 300 cancelled while no worker was there, each
    refusal of a queue of 3 read 600 stored messages."""
    from tests.conftest import start_undrained

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        await _submitted_and_cancelled(running, client, 300)  # while no worker takes them
        for n in range(3):
            assert (await _async_call(running, client, n))["success"] is True
        await asyncio.sleep(0.15)
        per_refusal, requests = await _read_per_refusal(running, client, monkeypatch)
        assert per_refusal < 50, f"each refusal read {per_refusal:.0f} stored messages ({requests} requests)"


async def test_a_failed_read_of_cancellations_still_refuses_a_full_queue(settings, client, monkeypatch):
    """review27: the read of the cancelled invocations can only make room; when it failed, its
    error came out of check_queue (UNAVAILABLE, which the SDK reports as "execution ... may be
    stored and go on", of an invocation never stored) where the queue was full as counted."""
    from spear.core.eventstore import StoreUnavailable
    from spear.jetstream import directget
    from tests.conftest import start_undrained

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        for n in range(3):
            assert (await _async_call(running, client, n))["success"] is True
        await asyncio.sleep(0.15)
        real = directget.read_request

        async def failing(nc, stream, request, timeout):
            if "cancelled" in str(request.get("next_by_subj", "")) or "multi_last" in request:
                raise StoreUnavailable("JetStream did not answer a read (simulated: a replica too slow)")
            return await real(nc, stream, request, timeout)

        monkeypatch.setattr(directget, "read_request", failing)
        refused = await _async_call(running, client, 9)
        assert refused.get("error_code") == "RESOURCE_EXHAUSTED", refused


# --- 46c6b28: spear up's check of credentials.json comes before the data dir's lock -------------------


def _request(n: int) -> InvokeFunctionRequest:
    return msgspec.json.decode(json.dumps(invoke_body("echo", "ASYNC", value=n)), type=InvokeFunctionRequest)


async def _stored(running: Spear) -> int:
    return await counting.count_matching(
        running.nc, running.names.stream, running.names.event("demo", "*", "requested"), timeout=2
    )


async def test_cancellations_kept_by_a_gateway_that_saw_no_consumer_go_with_a_stream_made_anew(settings, client):
    """review28: a gateway that never saw the task's consumer kept the cancellations of a stream
    made anew, subtracted them from the new stream's count and let calls in past the limit."""
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        js = client.jetstream()
        await js.delete_consumer(running.names.stream, running.names.worker_consumer("demo"))
        tuned = running.settings
        other = await components.start_service(stack, running.nc, tuned)  # a gateway that never saw it
        waiting = [(await _async_call(running, client, n))["execution_id"] for n in range(3)]
        for execution_id in waiting[:2]:
            cancelled, _ = await running.call(client, "cancel_execution", {"execution_id": execution_id})
            assert cancelled["success"] is True, cancelled
        assert (await other.invoke(_request(3))).success  # room made by the cancels (read on refusal)
        assert len(other.admission._cancelled.sequences("demo", 0)) == 2
        # the store is lost and made anew; the task's queue in it is filled (3 of 3) by another gateway
        await js.delete_stream(running.names.stream)
        await topology.ensure_base(client, running.names)
        fresh = await components.start_service(stack, running.nc, tuned)
        for n in range(3):
            assert (await fresh.invoke(_request(10 + n))).success
        assert await _stored(running) == 3
        admitted = 0
        for n in range(3):
            await other.admission.depth_within("demo", 0.0)  # (a /metrics scrape: the figure read now)
            try:
                reply = await other.invoke(_request(20 + n))
            except Exception as exc:  # ApiError RESOURCE_EXHAUSTED
                assert "RESOURCE_EXHAUSTED" in repr(exc) or "limit" in str(exc), exc
                continue
            admitted += reply.success
        stored = await _stored(running)
        assert admitted == 0, f"{admitted} let in: {stored} invocations wait, the limit is 3"


async def test_a_deleted_consumer_does_not_make_every_refusal_read_every_cancellation_again(
    settings, client, monkeypatch
):
    """review28: with the consumer deleted, every read forgot what was kept, and each refusal
    read every `cancelled` and `requested` again (600 messages for 300 cancelled)."""

    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=3)
        assert (await _async_call(running, client, 0))["success"] is True  # the consumer is read once
        assert "demo" in running.service.admission._delivered
        await client.jetstream().delete_consumer(running.names.stream, running.names.worker_consumer("demo"))
        await _submitted_and_cancelled(running, client, 300)  # while no worker takes them
        for n in range(2):
            assert (await _async_call(running, client, 1000 + n))["success"] is True
        await asyncio.sleep(0.15)
        per_refusal, requests = await _read_per_refusal(running, client, monkeypatch)
        assert per_refusal < 50, f"each refusal read {per_refusal:.0f} stored messages ({requests} requests)"


async def test_cancelled_invocations_removed_from_the_log_are_not_left_out_twice(settings, client):
    """review28: retention (or delete_task's cleanup) purges a cancelled execution's events,
    `requested` too: JetStream's count dropped by it, and the kept sequence was subtracted a
    second time, letting the queue take more than max_queue_size."""
    tuned = with_overrides(
        settings,
        async_execution={"max_queue_size": 3, "status_retention_hours": 0.0003},  # ~1 s
    )
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        await running.worker.stop()
        other = await components.start_service(stack, running.nc, tuned)  # another gateway's calls
        waiting = [(await other.invoke(_request(n))).execution_id for n in range(3)]
        for execution_id in waiting[:2]:
            cancelled, _ = await running.call(client, "cancel_execution", {"execution_id": execution_id})
            assert cancelled["success"] is True, cancelled
        assert (await _async_call(running, client, 3))["success"] is True  # room made by the cancels
        assert len(running.service.admission._cancelled.sequences("demo", 0)) == 2
        # retention removes the two cancelled executions (their `requested` too)
        await poll_until(lambda: _stored(running), lambda n: n == 2, timeout_s=20, what="2 stored")
        admitted = 0
        for n in range(3):
            await asyncio.sleep(0.15)
            admitted += (await _async_call(running, client, 10 + n)).get("success") is True
        live = await _stored(running)
        assert live <= 3, f"{live} invocations wait (none cancelled), the limit is 3 ({admitted} let in)"


async def _consumer_unreadable(running: Spear, client) -> None:
    """The gateway's consumer reads go where they are taken and never answered, as while the
    consumer's leader is being elected (probe58: its node killed)."""
    swallow = await client.subscribe("LOST.API.>")
    await client.flush()
    running.service.admission.js = running.nc.jetstream(prefix="LOST.API")
    assert swallow is not None


async def test_calls_are_admitted_while_their_tasks_consumer_cannot_be_read(settings, client):
    """probe58: a consumer whose leader's node was killed cannot be read for the 5-7 s of the
    election, and every ASYNC call was refused UNAVAILABLE (naming no execution) for as long.
    The figure last read counts instead, with the calls this gateway accepted since: they are
    admitted up to the limit, refused past it, and only the first call waits for a read."""
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=5)
        for n in range(2):  # 2 wait, as read
            assert (await _async_call(running, client, n))["success"] is True
        await running.service.admission.depth_within("demo", 0)
        await _consumer_unreadable(running, client)
        await asyncio.sleep(1.1)  # the figure is stale: a call would read it again
        replies, waits = [], []
        for n in range(4):
            began = time.monotonic()
            replies.append(await _async_call(running, client, 10 + n))
            waits.append(time.monotonic() - began)
        assert [r.get("error_code", "") for r in replies] == ["", "", "", "RESOURCE_EXHAUSTED"], replies
        assert all(r["success"] for r in replies[:3]) and all(r["execution_id"] for r in replies[:3])
        assert waits[0] < 2.6 and max(waits[1:]) < 0.5, waits  # (the first waited for the read's 2 s)
        stored = await counting.count_matching(
            running.nc, running.names.stream, running.names.event("demo", "*", "requested"), timeout=2
        )
        assert stored == 5


async def test_a_sync_deadline_is_answered_in_time_while_the_consumer_cannot_be_read(settings, client):
    """probe58: a SYNC call's DEADLINE_EXCEEDED waited for its estimate's consumer read, 2 s
    past the caller's wait while the consumer's leader was elected. It is answered with the
    figures at hand instead."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        await until_registered(running, "demo")
        assert (await _async_call(running, client, 0))["success"] is True
        await _consumer_unreadable(running, client)
        await asyncio.sleep(1.1)  # the figure is stale: an estimate would read it again
        began = time.monotonic()
        body = json.dumps(invoke_body("sleep", ms=3000)).encode()
        msg = await client.request(
            running.names.api("invoke_function"), body, timeout=5, headers={"Spear-Wait-Ms": "1000"}
        )
        reply = json.loads(msg.data)
        waited_s = time.monotonic() - began
        assert reply["error_code"] == "DEADLINE_EXCEEDED" and reply["estimated_completion_ms"] >= 1, reply
        assert waited_s < 1.3, waited_s


async def test_a_gateway_with_no_queue_figure_does_not_admit_while_the_consumer_cannot_be_read(settings, client):
    """review62: a gateway with no figure of the task's queue (just started, or the task forgotten
    after 5 idle minutes) admitted a whole queue's worth more while the consumer could not be
    read: 10 stored for a limit of 5. With nothing to go by, it refuses (UNAVAILABLE) as before."""
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=5)
        for n in range(5):  # the queue is full
            assert (await _async_call(running, client, n))["success"] is True
        admission = running.service.admission
        # what `_forget_idle` drops for a task idle 5 minutes (or a gateway just started keeps)
        for kept in (admission._queues, admission._undelivered, admission._delivered, admission._fresh):
            kept.clear()
        await _consumer_unreadable(running, client)
        reply = await _async_call(running, client, 10)  # (after the read's 2 s)
        assert reply.get("error_code") == "UNAVAILABLE", reply
        assert await _stored(running) == 5


async def test_calls_surely_not_stored_do_not_take_places_in_the_queue(settings, client):
    """review62: an append nothing took (no stream leader) was booked as unanswered, "maybe
    stored", so after an election the calls refused during it kept the queue full for a while.
    Surely not stored, they count for nothing."""
    from tests.conftest import off_its_subjects

    tuned = with_overrides(settings, nats={"request_timeout_ms": 300})
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, tuned, max_queue_size=2)
        config = await off_its_subjects(client, running.names)
        try:
            refused = [await _async_call(running, client, n) for n in range(3)]
        finally:
            await client.jetstream().update_stream(config)
        assert all("was not stored" in r.get("message", "") for r in refused), refused
        accepted = [await _async_call(running, client, 10 + n) for n in range(2)]
        assert all(r["success"] for r in accepted), accepted
        assert await _stored(running) == 2


async def test_a_sync_deadline_is_answered_in_time_while_the_log_cannot_be_read(settings, client, monkeypatch):
    """verify63: with the stream's leader lost, a SYNC wait's last read of the log at its deadline
    waited for its own timeout (5 s): a caller's 3 s wait was answered at 7.9 s, after the caller
    gave up. The read may outlast the wait by LAST_READ_S only. (The read is slowed here: a
    leader's election cannot be made on one server.)"""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        await until_registered(running, "demo")
        store = running.service.store
        real_last = store.last

        async def unanswered_last(execution_id):
            await asyncio.sleep(3)  # (what a read to a stream with no leader does: its timeout, 5 s)
            return await real_last(execution_id)

        monkeypatch.setattr(store, "last", unanswered_last)
        began = time.monotonic()
        body = json.dumps(invoke_body("sleep", ms=2000)).encode()
        msg = await client.request(
            running.names.api("invoke_function"), body, timeout=8, headers={"Spear-Wait-Ms": "1000"}
        )
        waited_s = time.monotonic() - began
        reply = json.loads(msg.data)
        assert reply["error_code"] == "DEADLINE_EXCEEDED" and reply["execution_id"], reply
        assert waited_s < 1.4, waited_s
