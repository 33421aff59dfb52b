"""A task served from code keeps a registry entry that live workers serve: the newest worker's
definition wins while it runs, and once no worker serves the entry's definition any more, the
remaining workers' replaces it (spear/worker/worker.py, `_keep_registered`).

A probe started a second worker with other functions under the same task id and stopped it: the
entry kept that definition for good, and the gateway refused every call of the functions the
remaining workers serve ("missing required parameter x", "task 'own' has no function 'about'")."""

import asyncio
import logging
from contextlib import AsyncExitStack

import spear
from spear.aio import poll_until
from spear.cli import components
from spear.worker import worker as worker_module
from tests.conftest import call_body, start_spear, until_registered
from tests.own_tasks import own

other = spear.Task("own", description="the same task id, other functions")


@other.function
def add(x: int) -> int:
    return -x


def _functions(running) -> set[str]:
    task = running.service.tasks.get("own")
    return {f"{f.name}({','.join(p.name for p in f.parameters)})" for f in task.functions} if task else set()


def _registered(running):
    """For poll_until: the functions the gateway knows of task `own` now."""

    async def functions() -> set[str]:
        return _functions(running)

    return functions


async def test_the_remaining_workers_definition_comes_back_when_the_other_one_stops(
    settings, client, monkeypatch, caplog
):
    monkeypatch.setattr(worker_module, "REGISTRY_REFRESH_S", 0.2)  # looks every 0.1-0.2 s
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        await components.start_worker(stack, running.nc, settings, [own])
        await until_registered(running, "own")
        assert "add(a,b)" in _functions(running) and "about(note)" in _functions(running)

        newer = await components.start_worker(stack, running.nc, settings, [other])  # a new release, say
        await poll_until(_registered(running), lambda names: names == {"add(x)"}, timeout_s=5)
        with caplog.at_level(logging.WARNING, logger="spear.worker.worker"):
            await asyncio.sleep(1.0)  # longer than REGISTRY_STALE_S: its worker keeps it fresh
        assert _functions(running) == {"add(x)"}
        # the older worker says so once, not at each of the entry's refreshes
        assert caplog.text.count("is registered with another definition") == 1, caplog.text
        # refreshed (updated_at moves), still the definition published first (created_at kept)
        before = running.service.tasks.get("own")
        await asyncio.sleep(0.5)
        after = running.service.tasks.get("own")
        assert before and after and after.created_at == before.created_at and after.updated_at != before.updated_at

        await newer.stop(grace_s=0.1)  # no worker serves it any more: the remaining one's comes back
        await poll_until(_registered(running), lambda names: "add(a,b)" in names, timeout_s=10)
        added, _ = await running.call(client, "invoke_function", call_body("add", a=1, b=2))
        assert added["result"]["result"] == 3
        about, _ = await running.call(client, "invoke_function", call_body("about"))
        assert about["success"], about

        # another worker of the same definition starting keeps the entry's created_at
        created = running.service.tasks.get("own").created_at
        await components.start_worker(stack, running.nc, settings, [own])
        await asyncio.sleep(0.3)
        assert created and running.service.tasks.get("own").created_at == created
