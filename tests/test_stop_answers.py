"""A gateway or HTTP API that stops answers the SYNC callers still waiting: DEADLINE_EXCEEDED with
their execution id (it goes on, and they can ask its status), not a connection closed or a
request left to time out (probe27: HTTP callers of an 8 s function were cut off at a clean stop
of `spear up`, their executions ran and ended unseen)."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack

import aiohttp
import nats.aio.msg
import nats.errors

from spear.aio import poll_until
from spear.cli import components
from spear.core.enums import ExecutionStatus
from spear.core.names import Names
from tests.conftest import has_status, invoke_body, start_spear, until_registered
from tests.processes import free_port


async def test_http_stops_answering_its_waiting_sync_callers(settings, client):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        running.service.stop_grace_s = 1.5  # (a worker's: 10 s)
        await until_registered(running, "demo")
        port = free_port()
        http_stack = AsyncExitStack()
        await components.start_http(http_stack, running.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            body = {**invoke_body("sleep", ms=4000), "execution_id": "http-at-stop"}

            async def call() -> tuple[int, dict]:
                async with session.post("/api/v1/invoke", json=body) as response:
                    return response.status, await response.json()

            calling = asyncio.ensure_future(call())

            async def started() -> bool:
                assert not calling.done(), calling
                last = await running.service.store.last("http-at-stop")
                return last is not None and last.event.kind == "started"

            await poll_until(started, bool, timeout_s=10, interval_s=0.05)  # it runs, its caller waits
            loop = asyncio.get_running_loop()
            began = loop.time()
            await http_stack.aclose()
            status, reply = await calling
        assert loop.time() - began < 3.0  # within the stop grace, not after the function
        assert status == 504 and reply["error_code"] == "DEADLINE_EXCEEDED", reply
        assert reply["execution_id"] and reply["status_endpoint"].endswith(f"/{reply['execution_id']}/status")
        await running.status_until(client, reply["execution_id"], has_status(ExecutionStatus.COMPLETED))


async def test_the_nats_gateway_stops_answering_its_waiting_sync_callers(settings, client):
    async with AsyncExitStack() as stack:
        service = (await start_spear(stack, settings, with_gateway=False)).service
        service.stop_grace_s = 1.5
        gateway_stack = AsyncExitStack()
        gateway = await components.start_gateway(gateway_stack, service)  # the only one
        names = Names(settings.subject_prefix)
        await poll_until(lambda: asyncio.sleep(0, service.tasks.get("demo")), bool, timeout_s=10, interval_s=0.02)
        body = json.dumps({**invoke_body("sleep", ms=8000), "execution_id": "waiting-at-stop"}).encode()

        async def call() -> nats.aio.msg.Msg:
            for _ in range(50):  # (as `Spear.call`: a subscription just made may not be known yet)
                try:
                    return await client.request(names.api("invoke_function"), body, timeout=15)
                except nats.errors.NoRespondersError:
                    await asyncio.sleep(0.1)
            raise AssertionError("no gateway answered")

        calling = asyncio.ensure_future(call())

        async def started() -> bool:
            assert not calling.done(), calling.result() if not calling.exception() else calling.exception()
            last = await service.store.last("waiting-at-stop")
            return last is not None and last.event.kind == "started"

        await poll_until(started, bool, timeout_s=10, interval_s=0.05)  # it runs, its caller waits
        assert gateway.in_flight
        loop = asyncio.get_running_loop()
        began = loop.time()
        await gateway_stack.aclose()
        reply = json.loads((await calling).data)
        assert loop.time() - began < 3.0  # within the stop grace, not after the function
        assert reply["error_code"] == "DEADLINE_EXCEEDED" and reply["execution_id"], reply


async def test_sync_callers_of_both_adapters_get_results_that_come_within_the_stop_grace(settings, client):
    """probe56: the HTTP API's stop gave the waits 2 s and ended every SYNC wait, the NATS
    gateway's callers' too: "this gateway is stopping" for a 3.5 s call whose worker went on and
    stored its result a second later. Each adapter's callers now wait for the stop grace (a
    worker's, 10 s) under one shared wait, whichever adapter stops first."""
    async with AsyncExitStack() as stack:
        service = (await start_spear(stack, settings, with_gateway=False)).service
        adapters = AsyncExitStack()
        await components.start_gateway(adapters, service)
        port = free_port()
        await components.start_http(adapters, service, port, host="127.0.0.1")  # (stops first)
        names = Names(settings.subject_prefix)
        await poll_until(lambda: asyncio.sleep(0, service.tasks.get("demo")), bool, timeout_s=10, interval_s=0.02)

        async def over_nats() -> dict:
            body = json.dumps({**invoke_body("sleep", ms=2500), "execution_id": "nats-at-stop"}).encode()
            for _ in range(50):
                try:
                    return json.loads((await client.request(names.api("invoke_function"), body, timeout=15)).data)
                except nats.errors.NoRespondersError:
                    await asyncio.sleep(0.1)
            raise AssertionError("no gateway answered")

        async def over_http() -> dict:
            body = {**invoke_body("sleep", ms=2500), "execution_id": "http-at-stop-2"}
            async with (
                aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session,
                session.post("/api/v1/invoke", json=body) as response,
            ):
                return {"status": response.status, **(await response.json())}

        calls = asyncio.gather(over_nats(), over_http())

        async def both_started() -> bool:
            lasts = [await service.store.last(i) for i in ("nats-at-stop", "http-at-stop-2")]
            return all(last is not None and last.event.kind == "started" for last in lasts)

        await poll_until(both_started, bool, timeout_s=10, interval_s=0.05)
        await adapters.aclose()
        by_nats, by_http = await calls
    assert by_nats["success"] and by_nats["result"]["status"] == "EXECUTION_STATUS_COMPLETED", by_nats
    assert by_http["status"] == 200 and by_http["result"]["status"] == "EXECUTION_STATUS_COMPLETED", by_http
