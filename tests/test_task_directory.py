"""The gateway's view of tasks served from code: `TaskDirectory.start` returns only once every task
the bucket holds is known (a gateway that has just started answered NOT_FOUND for a task its
workers had published: nats-py's watcher can say its initial values are in before it hands them
over)."""

from __future__ import annotations

import time
import uuid

import msgspec

from spear.core.contract import FunctionInfo, TaskInfo
from spear.jetstream import topology
from spear.service import registry
from spear.service.registry import TaskDirectory


async def test_a_started_directory_knows_every_task_the_bucket_holds(client):
    js = client.jetstream()
    bucket = "tasks" + uuid.uuid4().hex[:8]
    kv = await js.create_key_value(bucket=bucket)
    try:
        names = [f"task{i}" for i in range(3)]
        for name in names:
            info = TaskInfo(task_id=name, task_name=name, functions=[FunctionInfo(name="f")])
            await kv.put(name, msgspec.json.encode(info))
        await kv.delete("task2")  # a deleted task is not known
        for _ in range(1000):  # the race is narrow: under load, one start in ~1,000 lost it before
            directory = TaskDirectory()
            await directory.start(kv, await topology.subject_count(client, f"KV_{bucket}", 5.0))
            try:
                assert sorted(directory.code) == ["task0", "task1"]
            finally:
                await directory.stop()
    finally:
        await js.delete_key_value(bucket)


async def test_a_start_that_counted_a_key_gone_since_goes_on_with_what_came(client, monkeypatch, caplog):
    """A key removed between the count and the watch (its subject purged) never comes: the start
    waits INITIAL_VALUES_S for it, then goes on with the others and says so."""
    monkeypatch.setattr(registry, "INITIAL_VALUES_S", 0.5)
    js = client.jetstream()
    bucket = "tasks" + uuid.uuid4().hex[:8]
    kv = await js.create_key_value(bucket=bucket)
    try:
        for name in ("task0", "task1"):
            info = TaskInfo(task_id=name, task_name=name, functions=[FunctionInfo(name="f")])
            await kv.put(name, msgspec.json.encode(info))
        counted = await topology.subject_count(client, f"KV_{bucket}", 5.0)
        await js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.task1")  # gone, marker and all
        directory = TaskDirectory()
        began = time.monotonic()
        await directory.start(kv, counted)
        try:
            assert sorted(directory.code) == ["task0"] and time.monotonic() - began < 5
            assert "1 of 2 initial values came; going on" in caplog.text
        finally:
            await directory.stop()
    finally:
        await js.delete_key_value(bucket)
