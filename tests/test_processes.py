"""spear as real processes: worker processes sharing work, `spear up` stopped and restarted."""

import asyncio
import json

import aiohttp
import nats

from spear import contract
from spear.events import TERMINAL_KINDS
from tests.conftest import invoke_body, start_spear
from tests.processes import count_responders, free_port, spawn, stop, wait_ready


async def test_two_worker_processes_split_200_async_invocations_exactly_once(settings, client, nats_url, tmp_path):
    running, stops = await start_spear(settings, with_worker=False)
    workers = [
        await spawn("worker", "--nats-url", nats_url, prefix=settings.subject_prefix, log_path=tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    try:
        for _ in range(100):
            if await count_responders(client, "spear-worker", 0.1) >= 2 and running.service.tasks.get("demo"):
                break
        assert await count_responders(client, "spear-worker") >= 2
        terminal = []

        async def collect(msg):
            terminal.append(json.loads(msg.data))

        for subject in running.names.terminal_events():
            await client.subscribe(subject, cb=collect)
        await client.flush()
        ids = []
        for i in range(200):
            reply, _ = await running.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=5))
            assert reply["success"], reply
            ids.append(reply["execution_id"])
        for _ in range(300):
            if len(terminal) >= 200:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert sorted(event["execution_id"] for event in terminal) == sorted(ids)  # each once
        assert {event["result"]["status"] for event in terminal} == {contract.COMPLETED}
        worker_ids = set()
        for execution_id in ids:
            history = await running.service.store.history(execution_id)
            kinds = [event.kind for event, _ in history]
            assert kinds == ["requested", "started", "completed"], kinds
            assert sum(kind in TERMINAL_KINDS for kind in kinds) == 1
            worker_ids.add(history[1].event.worker_id)
        assert len(worker_ids) == 2, "both worker processes took a share"
    finally:
        for worker in workers:
            assert await stop(worker) == 0
        for stop_component in reversed(stops):
            await stop_component()


async def test_spear_up_restart_keeps_every_execution(tmp_path):
    data_dir = tmp_path / "data"
    http_port = free_port()
    args = ("up", "--data-dir", str(data_dir), "--nats-port", "-1", "--http-port", str(http_port))
    up = await spawn(*args, log_path=tmp_path / "up.log")
    try:
        url = await wait_ready(up)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{http_port}/api/v1/health") as response:
                assert response.status == 200
                assert (await response.json())["status"] == "healthy"
        cli = await spawn("invoke", "demo", "calculate_fibonacci", "n=30", "--nats-url", url)
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        sync_reply = json.loads(out)
        assert sync_reply["result"]["result"] == 832040
        cli = await spawn("invoke", "demo", "sleep", "ms=20", "--async", "--nats-url", url)
        out, _ = await cli.communicate()
        async_id = json.loads(out)["execution_id"]
        nc = await nats.connect(url)
        pending_ids = []
        for _ in range(20):  # some may still be pending at the stop: they must finish after the restart
            reply = await nc.request(
                "spear.api.invoke_function", json.dumps(invoke_body("sleep", mode="ASYNC", ms=50)).encode(), timeout=5
            )
            pending_ids.append(json.loads(reply.data)["execution_id"])
        await nc.close()
    finally:
        assert await stop(up) == 0
    up = await spawn(*args, log_path=tmp_path / "up.log")
    try:
        url = await wait_ready(up)
        cli = await spawn("status", sync_reply["execution_id"], "--nats-url", url)
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        status = json.loads(out)
        assert status["found"] is True and status["result"]["result"] == 832040
        nc = await nats.connect(url)
        for execution_id in [async_id, *pending_ids]:
            for _ in range(100):
                reply = await nc.request(
                    "spear.api.get_execution_status", json.dumps({"execution_id": execution_id}).encode(), timeout=5
                )
                status = json.loads(reply.data)
                if status["found"] and status["result"]["status"] == contract.COMPLETED:
                    break
                await asyncio.sleep(0.05)
            assert status["found"] is True and status["result"]["status"] == contract.COMPLETED, status
        await nc.close()
    finally:
        assert await stop(up) == 0
