"""STREAM mode with real parts: chunk events appended with the worker's fencing, the stream_function
endpoint, a client that joins late and replays what it missed, SSE from POST /api/v1/invoke, and
a retried streaming attempt (CONTRACT §4, §5, §8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from asyncio.subprocess import PIPE
from typing import Any

import aiohttp
import pytest

from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import TERMINAL_KINDS
from spear.jetstream import directget
from spear.worker.attempt import _classify
from spear.worker.context import Context, StreamedItems
from spear.worker.inprocess import drain
from tests.conftest import Spear, call_body, counted_direct_gets


async def until_terminal(running: Spear, execution_id: str, timeout: float = 20.0) -> list:
    """The execution's stored events once its terminal event is stored."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        history = await running.service.store.history(execution_id)
        if history and history[-1].event.kind in TERMINAL_KINDS:
            return [event for event, _ in history]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{execution_id} did not end")


async def stored_events(running: Spear, execution_id: str) -> list:
    return [event for event, _ in await running.service.store.history(execution_id)]


def chunks_of(events: list, attempt: int | None = None) -> list:
    return [e for e in events if e.kind == "chunk" and (attempt is None or e.attempt == attempt)]


async def test_stream_function_refuses_a_mode_that_is_none_and_writes_nothing(served, client):
    before = (await client.jetstream().stream_info(served.names.stream)).state.messages
    for mode in ("FOO", 7):
        reply, _ = await served.call(
            client, "stream_function", {**call_body("fast_stream", n=1), "execution_mode": mode}
        )
        assert reply["error_code"] == "INVALID_ARGUMENT" and "execution_mode" in reply["message"], reply
    assert (await client.jetstream().stream_info(served.names.stream)).state.messages == before


async def test_stream_function_replies_at_once_and_each_item_is_a_chunk(served, client):
    body = call_body("generate_text", task_id="demo", prompt="to be or not", tokens=6)
    reply, _ = await served.call(client, "stream_function", body)
    execution_id = reply["execution_id"]
    assert reply["success"] and reply["result"]["status"] == ExecutionStatus.PENDING
    assert reply["stream_subject"] == f"{served.names.prefix}.exec.demo.{execution_id}.*"  # CONTRACT §8
    assert reply["status_endpoint"] == f"/api/v1/execution/{execution_id}/status"
    events = await until_terminal(served, execution_id)
    assert [e.kind for e in events[:2]] == ["requested", "started"] and events[-1].kind == "completed"
    assert events[0].execution_mode == ExecutionMode.STREAM
    chunks = chunks_of(events)
    assert [(c.seq, c.attempt) for c in chunks] == [(i, 1) for i in range(6)]
    assert [c.data for c in chunks] == ["to ", "be ", "or ", "not ", "to ", "be"]
    assert events[-1].result.result == "to be or not to be"  # the generator's return value
    assert events.index(chunks[-1]) == len(events) - 2  # the terminal event follows the last chunk


async def test_invoke_in_stream_mode_and_the_modes_crossed(served, client):
    reply, _ = await served.call(client, "invoke_function", call_body("async_stream", "STREAM", n=3))
    assert reply["stream_subject"].endswith(f".{reply['execution_id']}.*")
    events = await until_terminal(served, reply["execution_id"])
    assert [c.data for c in chunks_of(events)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert events[-1].result.result == [{"i": 0}, {"i": 1}, {"i": 2}]  # async generators: the list
    # a plain function in STREAM mode: no chunks, its result at the end
    reply, _ = await served.call(client, "invoke_function", call_body("add", "STREAM", a=1, b=2))
    events = await until_terminal(served, reply["execution_id"])
    assert chunks_of(events) == [] and events[-1].result.result == 3
    # a generator in SYNC mode: the reply carries the final result (the chunks are stored too)
    reply, _ = await served.call(client, "invoke_function", call_body("generate_text", task_id="demo", prompt="a b"))
    assert reply["result"]["result"] == " ".join(["a", "b"] * 10) and reply["stream_subject"] == ""
    assert len(chunks_of(await stored_events(served, reply["execution_id"]))) == 20


async def test_a_generator_faster_than_appends_loses_and_reorders_nothing(served, client, monkeypatch):
    batches = []
    append_batch = served.service.store.append_batch.__func__

    async def counting(store, events, **options):
        batches.append(len(events))
        return await append_batch(store, events, **options)

    monkeypatch.setattr(type(served.worker.store), "append_batch", counting)
    reply, _ = await served.call(client, "stream_function", call_body("fast_stream", n=2000))
    events = await until_terminal(served, reply["execution_id"])
    assert [c.seq for c in chunks_of(events)] == list(range(2000)) == [c.data for c in chunks_of(events)]
    assert events[-1].result.result == list(range(2000))
    assert max(batches) > 1 and len(batches) < 2000  # items that piled up went out together


async def test_a_late_subscriber_replays_what_it_missed_and_gets_each_chunk_once_in_order(served, client):
    reply, _ = await served.call(client, "stream_function", call_body("async_stream", n=12, delay_ms=40))
    execution_id, subject = reply["execution_id"], reply["stream_subject"]
    for _ in range(1000):  # until chunk 3 is stored
        if any(c.seq >= 3 for c in chunks_of(await stored_events(served, execution_id))):
            break
        await asyncio.sleep(0.01)
    # What a client does: subscribe to the live events first, then read what the stream stored
    # (batched direct gets), and merge the two by stream sequence.
    live: asyncio.Queue = asyncio.Queue()

    async def on_event(msg):
        await live.put(msg)

    sub = await client.subscribe(subject, cb=on_event)
    await client.flush()
    seen: dict[int, dict] = {}
    async for msg in directget.read_all(client, served.names.stream, subject, 0, 5.0):
        seen[msg.seq] = json.loads(msg.data)
    replayed = sum(1 for event in seen.values() if event["type"] == "chunk")
    while not any(event["type"] in TERMINAL_KINDS for event in seen.values()):
        msg = await asyncio.wait_for(live.get(), 10)
        seen.setdefault(int(msg.headers["Nats-Sequence"]), json.loads(msg.data))  # dedupe by sequence
    await sub.unsubscribe()
    chunks = [seen[seq] for seq in sorted(seen) if seen[seq]["type"] == "chunk"]
    assert replayed >= 4  # chunks 0..3 were stored before the subscription
    assert [c["seq"] for c in chunks] == list(range(12)) and [c["data"]["i"] for c in chunks] == list(range(12))


async def test_a_retried_streaming_attempt_starts_again_at_seq_0(served, client):
    reply, _ = await served.call(client, "stream_function", call_body("flaky_stream"))
    events = await until_terminal(served, reply["execution_id"])
    kinds = [e.kind for e in events]
    first = ["started", "chunk", "chunk", "chunk", "retrying"]
    assert kinds == ["requested", *first, "started", "chunk", "chunk", "completed"]
    assert [(c.attempt, c.seq, c.data) for c in chunks_of(events)] == [
        (1, 0, "a1-0"),
        (1, 1, "a1-1"),
        (1, 2, "a1-2"),
        (2, 0, "a2-0"),
        (2, 1, "a2-1"),
    ]
    assert events[-1].result.attempt == 2 and events[-1].result.result == ["a2-0", "a2-1"]


async def test_an_item_that_is_not_json_fails_the_execution_naming_it(served, client):
    reply, _ = await served.call(client, "stream_function", call_body("item_not_json", at=300))
    events = await until_terminal(served, reply["execution_id"])
    result = events[-1].result
    assert result.status == ExecutionStatus.FAILED and result.error_code == "RESULT_NOT_SERIALIZABLE", result
    # the 301st item: not the number of chunks queued when it came (probe19: "chunk 0" for the second)
    assert result.error_message.startswith("chunk 300 cannot be stored as JSON"), result
    assert [c.data for c in chunks_of(events)] == [float(n) for n in range(300)]


async def test_a_stream_whose_items_all_fit_as_chunks_but_not_as_one_result_completes(served, client):
    """probe19: 20 chunks of 1 MiB, every one delivered, then FAILED (ResultTooLarge): the list
    of items as the result did not fit an event. The chunks are the output; the result is left out."""
    reply, _ = await served.call(client, "stream_function", call_body("sized_stream", items=10, kib=1024))
    events = await until_terminal(served, reply["execution_id"])
    result = events[-1].result
    assert result.status == ExecutionStatus.COMPLETED and result.result is None, result.error_message
    assert (
        "the 10 items (" in result.metrics["result_omitted"]
        and "they are the execution's chunks" in (result.metrics["result_omitted"])
    )
    assert [len(c.data) for c in chunks_of(events)] == [1024 * 1024] * 10
    reply, _ = await served.call(client, "stream_function", call_body("sized_stream", items=3, kib=1))
    events = await until_terminal(served, reply["execution_id"])
    assert events[-1].result.result == ["x" * 1024] * 3 and events[-1].result.metrics == {}  # fits: the list


async def test_a_chunk_too_large_for_an_event_fails_the_execution(served, client):
    reply, _ = await served.call(client, "invoke_function", call_body("big_chunk", megabytes=9))
    result = reply["result"]
    assert result["status"] == ExecutionStatus.FAILED and result["error_code"] == "FUNCTION_ERROR"
    assert result["error_message"].startswith("ChunkTooLarge: chunk 1 is 9437186 bytes, more than the")
    assert [c.data for c in chunks_of(await stored_events(served, reply["execution_id"]))] == ["small first"]


async def test_http_invoke_in_stream_mode_streams_the_chunks_as_sse(served):
    body = call_body("generate_text", "STREAM", task_id="demo", prompt="one two three", tokens=5, delay_ms=20)
    async with aiohttp.ClientSession(served.http) as http:
        headers = {"Accept": "text/event-stream"}
        async with http.post("/api/v1/invoke", json=body, headers=headers) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            assert response.headers["Location"].startswith("/api/v1/execution/")
            frames = (await response.text()).strip().split("\n\n")
        events = [dict(line.split(": ", 1) for line in frame.splitlines()) for frame in frames]
        kinds = [e["event"] for e in events]
        assert kinds[0] == "requested" and kinds[-1] == "completed" and kinds.count("chunk") == 5
        chunks = [json.loads(e["data"]) for e in events if e["event"] == "chunk"]
        assert [c["seq"] for c in chunks] == list(range(5))
        assert "".join(c["data"] for c in chunks) == json.loads(events[-1]["data"])["result"]["result"]
        assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
        async with http.post("/api/v1/invoke", json=body) as response:  # no Accept: as for ASYNC
            reply = await response.json()
            assert response.status == 202 and reply["stream_subject"].endswith(f".{reply['execution_id']}.*")


async def test_cancelling_a_stream_stops_it_and_no_chunk_follows_the_request(served, client):
    body = call_body("generate_text", task_id="demo", prompt="on and on", tokens=500, delay_ms=10)
    reply, _ = await served.call(client, "stream_function", body)
    execution_id = reply["execution_id"]
    for _ in range(1000):  # until chunk 3 is stored
        if any(c.seq >= 3 for c in chunks_of(await stored_events(served, execution_id))):
            break
        await asyncio.sleep(0.01)
    cancel, _ = await served.call(client, "cancel_execution", {"execution_id": execution_id, "reason": "enough"})
    assert cancel["final_status"] == ExecutionStatus.CANCELLED
    events = await until_terminal(served, execution_id)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "cancelled" and "chunk" not in kinds[kinds.index("cancel_requested") :]
    seqs = [c.seq for c in chunks_of(events)]
    assert seqs == list(range(len(seqs))) and 4 <= len(seqs) < 500


def _held_writer(execution_id: str, max_chunk_bytes: int):
    """An attempt's writer of a STREAM execution whose `started` is not stored: it holds what it
    is given (it must store nothing)."""
    from spear.core.contract import format_timestamp
    from spear.core.events import Requested
    from spear.worker.appends import AttemptAppends

    async def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a held writer stores nothing")

    request = Requested(
        execution_id=execution_id,
        task_id="t",
        function_name="f",
        at=format_timestamp(0),
        execution_mode=ExecutionMode.STREAM,
        parameters={},
    )
    return AttemptAppends(never, never, request, Context(execution_id, "t", "f", 1), None, max_chunk_bytes)


async def test_a_report_gives_way_to_a_newer_one_across_chunks_but_not_across_a_log_line():
    """What a writer holds before `started` is stored, in the order it will be stored: a progress
    report not yet stored is dropped for a newer one, unless a log line came between them."""
    from spear.core.events import Chunk, Logged

    appends = _held_writer("held-1", 1 << 20)
    appends.report(0.1, "p1")
    await appends.chunk("c0")
    appends.report(0.2, "p2")  # p1 gives way: only a chunk came between
    await appends.chunk("c1")
    appends.report(None, "a log line")
    appends.report(0.3, "p3")  # p2 stays: a log line came after it
    appends.report(0.4, "p4")  # p3 gives way
    held = [
        event.message
        if isinstance(event, Logged)
        else json.loads(bytes(event.data))
        if isinstance(event, Chunk)
        else event
        for event in appends.take_held()
    ]
    assert held == ["c0", "p2", "c1", "a log line", "p4"]


async def test_a_generator_ahead_of_its_appends_waits_once_its_chunks_come_to_max_pending_bytes():
    """probe32: the chunks a generator yields faster than they are stored waited in the worker
    up to 2,048 of them whatever their size (~1 GB of 512 KB items). Now also up to
    MAX_PENDING_BYTES: a generator's thread, and a coroutine, wait there until the writer stores
    some; a chunk larger than the bound alone still goes."""
    import threading

    from spear.core.events import Chunk
    from spear.worker import appends as appends_module
    from spear.worker.appends import AttemptAppends
    from spear.worker.context import ExecutionCancelled

    item = "x" * (512 * 1024)  # (JSON: 2 bytes more)
    fits = appends_module.MAX_PENDING_BYTES // (len(item) + 2)

    def queued(appends: AttemptAppends) -> int:
        return sum(isinstance(event, Chunk) for event in appends._queue)

    # From a generator's thread: it stops at the bound and waits (a held writer stores nothing)
    appends = _held_writer("held-2", 1 << 20)
    yielded = []

    def generator() -> None:
        with contextlib.suppress(ExecutionCancelled):
            for index in range(100):
                appends.chunk_from_thread(item)
                yielded.append(index)

    thread = threading.Thread(target=generator)
    thread.start()
    await asyncio.sleep(1.0)
    assert len(yielded) == fits and queued(appends) == fits, (len(yielded), queued(appends))
    appends._close()  # (as a conflict does): the waiting thread stops
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive() and len(yielded) == fits

    # From a coroutine: the same bound
    appends = _held_writer("held-3", 1 << 20)
    for _ in range(fits):
        await asyncio.wait_for(appends.chunk(item), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(appends.chunk(item), 0.5)
    assert queued(appends) == fits

    # One chunk over the bound alone is not held for ever
    appends = _held_writer("held-4", 64 << 20)
    await asyncio.wait_for(appends.chunk("y" * (appends_module.MAX_PENDING_BYTES + 1)), 1)
    assert queued(appends) == 1


async def test_the_clients_follow_a_retried_stream_attempt_by_attempt(served, nats_url):
    """A retried attempt's items need not be the earlier attempt's: `chunks()` gives each
    attempt's in full, with its attempt; `stream()`, whose caller cannot tell the two apart, says
    the stream restarted (the items taken from seq onwards mixed two attempts' output)."""
    from spear import Client, errors

    async with Client([nats_url], prefix=served.settings.subject_prefix) as sdk:
        handle = await sdk.submit("own", "flaky_stream", mode="STREAM")
        chunks = [chunk async for chunk in handle.chunks()]
        assert [(c.attempt, c.seq, c.data) for c in chunks] == [
            (1, 0, "a1-0"),
            (1, 1, "a1-1"),
            (1, 2, "a1-2"),
            (2, 0, "a2-0"),
            (2, 1, "a2-1"),
        ]
        got = []
        with pytest.raises(errors.StreamRestarted) as restarted:
            async for item in sdk.stream("own", "flaky_stream"):
                got.append(item)
        assert got == ["a1-0", "a1-1", "a1-2"] and restarted.value.attempt == 2
        assert restarted.value.execution_id
        got = []  # a new attempt that yields nothing: told by its `retrying`, not by a next chunk
        with pytest.raises(errors.StreamRestarted):
            async for item in sdk.stream("own", "stale_then_empty"):
                got.append(item)
        assert got == ["stale-0", "stale-1"]
        # joined again by its id once its retry is stored: its last run only (probe55: it raised
        # StreamRestarted at every try, the first run being replayed first)
        joined = [item async for item in sdk.stream("own", "flaky_stream", execution_id=handle.id)]
        assert joined == ["a2-0", "a2-1"]
        # a new execution under an id of the caller's is followed from its start (probe61)
        got = []
        with pytest.raises(errors.StreamRestarted):
            async for item in sdk.stream("own", "flaky_stream", execution_id=f"{handle.id}-new"):
                got.append(item)
        assert got == ["a1-0", "a1-1", "a1-2"]
        # ... and by `spear invoke --stream --execution-id`: the last run's output, nothing said
        # of a restart the reader never saw
        code, out, err = await _cli(served, nats_url, "own", "flaky_stream", "--stream", "--execution-id", handle.id)
        assert (code, out) == (0, "a2-0a2-1\n") and "starts the stream again" not in err, err
        fresh = await sdk.submit("own", "anything", mode="STREAM", execution_id="one-run-" + handle.id[:8], first="x")
        assert [item async for item in sdk.stream("own", "anything", execution_id=fresh.id, first="x")] == [
            {"first": "x"}
        ]


async def _cli(served: Any, nats_url: str, *arguments: str) -> tuple[int, str, str]:
    """`spear invoke ARGUMENTS` against `served` in a process of its own: exit code, stdout, stderr."""
    environment = {**os.environ, "SPEAR_NATS_URL": nats_url, "SPEAR_SUBJECT_PREFIX": served.settings.subject_prefix}
    environment.pop("SPEAR_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spear", "invoke", *arguments, env=environment, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return int(process.returncode or 0), out.decode(), err.decode()


def test_a_long_streams_items_are_kept_only_up_to_what_a_result_can_carry(monkeypatch):
    """probe32: a worker held every item a generator yielded until the run ended (600 MB of a
    long stream; an OOM kill waiting to happen). Only what a result event can carry is kept:
    a longer list is left out of the result anyway; past that the items are only counted."""
    monkeypatch.setattr(StreamedItems, "limit", 1000)
    ctx = Context("e", "t", "f", 1)
    handed_on: list[str] = []
    fits = drain(lambda: ("x" * 100 for _ in range(5)), ctx, handed_on.append)
    assert fits == ["x" * 100] * 5 and not fits.overflowed
    items = drain(lambda: ("x" * 100 for _ in range(50)), ctx, handed_on.append)
    assert len(handed_on) == 55  # (every item went on as a chunk)
    assert items.overflowed and items == [] and items.yielded == 50
    status, value, _, note, _ = _classify(None, items, max_result_bytes=5000)
    assert status == ExecutionStatus.COMPLETED and value is None and "the 50 items (over 1000 bytes" in note


async def test_a_late_reader_of_a_long_stream_reads_a_page_at_a_time(served, client, monkeypatch):
    """probe32: each page of GetExecutionEvents read (and redacted) the whole rest of the history
    to keep a few events of it, so catching up took time in the square of the stream's length;
    and each late SSE client held the rest of the stream in memory. A page is one read now."""
    reply, _ = await served.call(client, "stream_function", call_body("sized_stream", items=24, kib=512))
    execution_id = reply["execution_id"]
    events = await until_terminal(served, execution_id)
    assert len(chunks_of(events)) == 24  # 12 MB stored
    read = counted_direct_gets(monkeypatch, lambda found: sum(len(message.data) for message in found))
    page, _ = await served.call(client, "get_execution_events", {"execution_id": execution_id, "after_seq": 0})
    assert page["has_more"] is True and sum(read) <= directget.BATCH_BYTES + (512 << 10), read
    read.clear()
    seen, after = 0, 0
    while True:  # the whole stream, page after page: each about a page's bytes
        page, _ = await served.call(client, "get_execution_events", {"execution_id": execution_id, "after_seq": after})
        seen += len(page["events"])
        after = page["events"][-1]["seq"]
        if not page["has_more"]:
            break
    assert seen == len(events) and sum(read) < 2 * 12 * (1 << 20), sum(read)  # (each event read about once)
    read.clear()
    async with aiohttp.ClientSession() as http:  # a late SSE client: it reads a page at a time as well
        url = f"{served.http}/api/v1/executions/{execution_id}/events"
        async with http.get(url, headers={"Accept": "text/event-stream"}) as response:
            body = await response.text()
    assert body.count("event: chunk") == 24 and max(read) <= directget.BATCH_BYTES + (512 << 10), read


async def test_an_sse_client_resuming_near_the_end_reads_only_what_it_missed(served, client, monkeypatch):
    """review29: the SSE route read the whole history (and held it) only to say NOT_FOUND before
    the stream started, so every late SSE client still read and held the whole stream, even one
    resuming with Last-Event-ID right before the end."""
    reply, _ = await served.call(client, "stream_function", call_body("sized_stream", items=24, kib=512))
    execution_id = reply["execution_id"]
    events = await until_terminal(served, execution_id)
    assert len(chunks_of(events)) == 24  # 12 MB stored
    resume = (await served.service.store.history(execution_id))[-2].seq  # (before counting)
    read = counted_direct_gets(monkeypatch, lambda found: sum(len(message.data) for message in found))
    async with aiohttp.ClientSession() as http:
        url = f"{served.http}/api/v1/executions/{execution_id}/events"
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(resume)}
        async with http.get(url, headers=headers) as response:
            body = await response.text()
    assert body.count("event: completed") == 1 and body.count("event: chunk") == 0, body[:300]
    # it resumed before the last event: one small read would do; it read all 12 MB first
    assert sum(read) < (1 << 20), read


def test_a_streamed_list_that_fits_exactly_is_the_result(monkeypatch):
    """review29: `keep` counted a separator for every item, one more than the list's JSON has: a
    result of exactly what an event can carry was left out."""
    monkeypatch.setattr(StreamedItems, "limit", 1000)
    item = "x" * 996  # '["xxx…"]' is exactly 1000 bytes
    items = drain(lambda: (i for i in [item]), Context("e", "t", "f", 1), None)
    status, value, _, note, _ = _classify(None, items, max_result_bytes=1000)
    assert status == ExecutionStatus.COMPLETED
    assert value == [item], note


def sized(n: int, size: int):
    for _ in range(n):
        yield "x" * size


async def test_a_process_isolated_stream_keeps_items_only_up_to_the_workers_limit(monkeypatch):
    """review29: a child of the process pool (a fresh interpreter) kept the class default (64 MiB),
    not the worker's limit: an isolated streaming function held, and sent back, items far past
    what a result event can carry."""
    from spear.worker.isolation import ProcessPool

    monkeypatch.setattr(StreamedItems, "limit", 1000)  # as Worker.start does
    pool = ProcessPool(1)
    try:
        got = await pool.run(sized, {"n": 50, "size": 100}, None, Context("e", "t", "f", 1), True, None)
    finally:
        await pool.close()
    assert isinstance(got, StreamedItems) and got.yielded == 50
    assert got.overflowed and len(got) == 0, (len(got), got.overflowed)
