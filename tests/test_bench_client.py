"""The bench's ASYNC client reads only what it needs of a reply taken raw: the execution id of an
accepted call, an error as an error, and the Retry-After of a full queue, as spear sends them."""

import asyncio
from contextlib import AsyncExitStack

import msgspec
import pytest

from spear.cli import components
from spear.cli.bench.measure import check_accepted, raw_backpressure_s
from spear.cli.bench.pipelined import PipelinedCalls
from spear.cli.bench.plan import WINDOW
from spear.demo import demo
from spear.jetstream import rawrequests
from tests.conftest import invoke_body, start_undrained, until_registered


async def test_the_bench_client_reads_accepts_errors_and_back_pressure_as_spear_sends_them(settings, client):
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=1)
        subject, body = running.names.api("invoke_function"), msgspec.json.encode(invoke_body("echo", "ASYNC", value=1))
        accepted = await rawrequests.request(client, subject, body, timeout=10)
        assert check_accepted(accepted.data) == msgspec.json.decode(accepted.data)["execution_id"]
        assert raw_backpressure_s(accepted.headers) is None
        refused = await rawrequests.request(client, subject, body, timeout=10)
        assert msgspec.json.decode(refused.data)["error_code"] == "RESOURCE_EXHAUSTED"
        assert raw_backpressure_s(refused.headers) == 1.0
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            check_accepted(refused.data)


def test_a_reply_that_is_no_accept_is_an_error():
    for data in (b"", b"{", b'{"success": true, "execution_id": null}', b'{"success": "yes"}'):
        with pytest.raises(RuntimeError, match="spear replied with an error"):
            check_accepted(data)


def test_back_pressure_is_bounded_and_a_bad_value_waits_a_second():
    assert raw_backpressure_s(b"NATS/1.0 429\r\nRetry-After: 30\r\n\r\n") == 1.0
    assert raw_backpressure_s(b"NATS/1.0\r\nRetry-After: 0\r\n\r\n") == 0.05
    assert raw_backpressure_s(b"NATS/1.0\r\nRetry-After: soon\r\n\r\n") == 1.0
    assert raw_backpressure_s(b"NATS/1.0\r\nX-Retry-After: 5\r\n\r\n") is None


async def test_pipelined_calls_make_every_call_once_and_hand_over_each_accepted_id(spear, client):
    await until_registered(spear, "demo")
    subject, body = spear.names.api("invoke_function"), msgspec.json.encode(invoke_body("echo", "ASYNC", value=1))
    accepted: list[str] = []
    calls = PipelinedCalls(client, subject, body, 3 * WINDOW + 5, 60.0, accepted.append)
    assert await calls.run() > 0
    assert calls.made == len(accepted) == 3 * WINDOW + 5
    assert len(set(accepted)) == len(accepted)
    await spear.status_until(client, accepted[-1], lambda reply: reply.get("found") is True)  # stored


async def test_pipelined_calls_back_off_a_full_queue_and_send_again(settings, client):
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=2)
        subject, body = running.names.api("invoke_function"), msgspec.json.encode(invoke_body("echo", "ASYNC", value=1))
        for _ in range(2):  # the queue is full
            check_accepted((await rawrequests.request(client, subject, body, timeout=10)).data)
        accepted: list[str] = []
        calls = PipelinedCalls(client, subject, body, 2, 60.0, accepted.append)
        run = asyncio.create_task(calls.run())
        await asyncio.sleep(1.5)
        assert not accepted and not run.done()  # refused, and sent again after each Retry-After
        await components.start_worker(stack, running.nc, running.settings, [demo])  # the queue drains
        await asyncio.wait_for(run, 30)
        assert len(set(accepted)) == 2 and calls.made == 2


async def test_pipelined_calls_end_at_an_error_reply(spear, client):
    subject = spear.names.api("invoke_function")
    body = msgspec.json.encode({**invoke_body("echo", "ASYNC"), "task_id": "no-such-task"})
    calls = PipelinedCalls(client, subject, body, 10, 60.0, lambda _: None)
    with pytest.raises(RuntimeError, match="spear replied with an error"):
        await calls.run()


async def test_pipelined_calls_give_up_refused_calls_when_the_time_is_up(settings, client):
    async with AsyncExitStack() as stack:
        running = await start_undrained(stack, settings, max_queue_size=1)  # nothing drains the queue
        subject, body = running.names.api("invoke_function"), msgspec.json.encode(invoke_body("echo", "ASYNC", value=1))
        check_accepted((await rawrequests.request(client, subject, body, timeout=10)).data)  # the queue is full
        accepted: list[str] = []
        calls = PipelinedCalls(client, subject, body, 3, 1.5, accepted.append)
        await asyncio.wait_for(calls.run(), 10)  # it ends: refused calls are not sent again for ever
        assert accepted == [] and calls.made == 0 and calls.given_up == 3
