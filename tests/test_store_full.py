"""JetStream with no room left (its `max_file_store` reached): calls are refused
RESOURCE_EXHAUSTED, health says why, and no function runs while its `started` cannot be stored;
once there is room, what was accepted runs, once each. probe20: INTERNAL, health `healthy`,
and each pending function ran 12 times in 25 s, unrecorded."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

from spear.cli import components
from spear.core.config import Settings, with_overrides
from spear.jetstream.embedded import EmbeddedNats
from spear.worker.worker import Worker
from tests.conftest import Spear, call_body, has_status, start_spear, until_registered
from tests.own_tasks import own
from tests.processes import free_port


async def _fill(nc) -> None:
    """Another stream takes whatever room is left."""
    js = nc.jetstream()
    await js.add_stream(name="FILLER", subjects=["filler"])
    for _ in range(10_000):
        reply = json.loads((await nc.request("filler", b"x" * 500_000, timeout=5)).data)
        if "error" in reply:
            assert reply["error"]["err_code"] == 10023, reply  # insufficient resources
            return
    raise AssertionError("the store never filled")


@dataclass
class SmallStore:
    """spear on a nats-server of its own whose JetStream may store 16 MB, and a worker serving `own`."""

    running: Spear
    settings: Settings
    stack: AsyncExitStack
    worker: Worker


@contextlib.asynccontextmanager
async def _on_a_small_store(settings: Settings, tmp_path) -> AsyncIterator[SmallStore]:
    store = tmp_path / "nats" / "jetstream"
    limited = f"jetstream {{ store_dir: {json.dumps(str(store))}, max_file_store: 16MB }}"
    server = EmbeddedNats(tmp_path / "nats", port=free_port(), extra_config=limited)
    url = await asyncio.to_thread(server.start)
    try:
        own_nats = with_overrides(settings, nats={"urls": [url]})
        async with AsyncExitStack() as stack:
            running = await start_spear(stack, own_nats, with_worker=False)
            worker = await components.start_worker(stack, running.nc, own_nats, [own])
            await until_registered(running, "own")
            yield SmallStore(running, own_nats, stack, worker)
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_full_store_refuses_calls_says_so_and_runs_nothing_unrecorded(settings, tmp_path):
    marks = tmp_path / "marks"
    async with _on_a_small_store(settings, tmp_path) as small:
        running = small.running
        await small.worker.stop()
        ids = []
        for _ in range(4):  # accepted, waiting for a worker
            reply, _ = await running.call(
                running.nc, "invoke_function", call_body("notes_each_run", "ASYNC", marks=str(marks))
            )
            ids.append(reply["execution_id"])
        await _fill(running.nc)

        refused, headers = await running.call(running.nc, "invoke_function", call_body("notes_each_run", marks="x"))
        assert refused["error_code"] == "RESOURCE_EXHAUSTED" and "its storage is full" in refused["message"], refused
        assert headers["Nats-Service-Error-Code"] == "429" and headers["Retry-After"] == "5"
        health = await running.service.health()
        assert health.status == "degraded" and "JetStream refused to store an event" in health.message, health

        await components.start_worker(small.stack, running.nc, small.settings, [own])  # it cannot store a `started`
        await asyncio.sleep(6)  # deliveries handed back, and offered again after 5 s
        assert not marks.exists(), marks.read_text()  # nothing ran

        await running.nc.jetstream().purge_stream("FILLER")  # room again: each runs, once
        for execution_id in ids:
            await running.status_until(running.nc, execution_id, lambda r: r.get("result", {}).get("result"), 20)
        assert marks.read_text().count("ran") == 4
        for execution_id in ids:
            kinds = [stored.event.kind for stored in await running.service.store.history(execution_id)]
            assert kinds == ["requested", "started", "completed"], kinds


async def test_an_end_refused_for_lack_of_room_is_stored_once_there_is_room(settings, tmp_path):
    """The attempt ran; its end was refused: kept and tried again, as when JetStream does not
    answer (review15: dropped, the attempt counted lost, the function run a second time)."""
    marks = tmp_path / "marks"
    async with _on_a_small_store(settings, tmp_path) as small:
        running = small.running
        body = call_body("notes_then_sleeps", "ASYNC", marks=str(marks), ms=1500)
        reply, _ = await running.call(running.nc, "invoke_function", body)
        execution_id = reply["execution_id"]
        await running.status_until(running.nc, execution_id, has_status("EXECUTION_STATUS_RUNNING"))
        await _fill(running.nc)
        await asyncio.sleep(2.5)  # it ended meanwhile: its end is refused, and kept
        await running.nc.jetstream().purge_stream("FILLER")
        await running.status_until(running.nc, execution_id, has_status("EXECUTION_STATUS_COMPLETED"), 20)
        kinds = [stored.event.kind for stored in await running.service.store.history(execution_id)]
        assert kinds == ["requested", "started", "completed"], kinds
        assert marks.read_text().count("ran") == 1


def test_the_gateway_runs_no_call_itself_while_jetstream_has_no_room(settings):
    """A gateway-run SYNC call runs, then stores its chain: refused for lack of room, it ran for
    nothing, and again at each retry (review15). Such calls take the usual path for a while."""
    import time

    from spear.core.events import Requested
    from spear.core.memstore import MemoryEventStore
    from spear.demo import demo
    from spear.service.inline import InlineCalls

    store = MemoryEventStore()
    calls = InlineCalls(store, settings, [demo], max_payload=1024 * 1024)
    request = Requested(
        execution_id="e",
        task_id="demo",
        function_name="echo",
        at="2026-01-01T00:00:00.000Z",
        attempt=0,
        execution_mode="EXECUTION_MODE_SYNC",
    )
    assert calls.function(request, client_chose_id=False) is not None
    store.full_at = time.monotonic()
    assert calls.function(request, client_chose_id=False) is None
