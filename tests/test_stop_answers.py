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
        assert loop.time() - began < 3.0  # within the stop's time (2.5 s), not after the function
        assert status == 504 and reply["error_code"] == "DEADLINE_EXCEEDED", reply
        assert reply["execution_id"] and reply["status_endpoint"].endswith(f"/{reply['execution_id']}/status")
        await running.status_until(client, reply["execution_id"], has_status(ExecutionStatus.COMPLETED))


async def test_the_nats_gateway_stops_answering_its_waiting_sync_callers(settings, client):
    async with AsyncExitStack() as stack:
        service = (await start_spear(stack, settings, with_gateway=False)).service
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
        assert loop.time() - began < 5.5  # within the stop's time (5 s), not after the function
        assert reply["error_code"] == "DEADLINE_EXCEEDED" and reply["execution_id"], reply
