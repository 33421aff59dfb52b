"""Live SSE feeds share one reader per process (probe57): with N feeds open, each stored event is
read from the stream once, not N times, and every feed still gets every event exactly once, in
stream order; a feed that falls behind reads what it missed by itself, without stalling the
others or queueing without bound."""

import asyncio
import json
from contextlib import AsyncExitStack

import aiohttp
import pytest
import pytest_asyncio

from spear.cli import components
from spear.core.enums import ExecutionStatus
from spear.jetstream import directget
from tests.conftest import invoke_body, sse_frames
from tests.processes import free_port

SSE = {"Accept": "text/event-stream"}


@pytest_asyncio.fixture
async def http(spear):
    port = free_port()
    async with AsyncExitStack() as stack:
        await components.start_http(stack, spear.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            yield session


def events_read(monkeypatch: pytest.MonkeyPatch, subject_filter: str) -> list[int]:
    """From now on, how many stored messages each batched direct get on `subject_filter`
    returned (whoever asked: a feed, the worker, a SYNC wait)."""
    read: list[int] = []
    real = directget.read_request

    async def counted(nc, stream, request, timeout):  # type: ignore[no-untyped-def]
        batch = await real(nc, stream, request, timeout)
        if request.get("next_by_subj") == subject_filter:
            read.append(len(batch.found))
        return batch

    monkeypatch.setattr(directget, "read_request", counted)
    return read


async def _stored_since(spear, after_seq: int, subject: str) -> list[tuple[int, str, str]]:
    """(sequence, kind, execution id) of what the stream stores on `subject` after `after_seq`."""
    stored = await spear.service.stream.stored(subject, after_seq, 10_000)
    return [(s.seq, s.event.kind, s.event.execution_id) for s in stored]


def _seen(frames: list[dict[str, str]]) -> list[tuple[int, str, str]]:
    return [(int(f["id"]), f["event"], json.loads(f["data"])["execution_id"]) for f in frames]


async def test_open_feeds_read_each_stored_event_once_and_each_sends_every_event_once_in_order(
    spear, http, monkeypatch
):
    feeds, calls = 20, 10
    subject = spear.names.event("*", "*", "*")
    responses = [await http.get("/api/v1/events", headers=SSE) for _ in range(feeds)]
    try:
        assert {r.status for r in responses} == {200}
        start = await spear.service.stream.last_seq()
        read = events_read(monkeypatch, subject)
        for n in range(calls):
            async with http.post("/api/v1/invoke", json=invoke_body("echo", value=n)) as reply:
                assert (await reply.json())["result"]["status"] == ExecutionStatus.COMPLETED
        received = await asyncio.wait_for(asyncio.gather(*(sse_frames(r, 3 * calls) for r in responses)), 20)
        feeds_read = sum(read)
    finally:
        for response in responses:
            response.close()
    stored = await _stored_since(spear, start, subject)
    assert len(stored) == 3 * calls  # requested, started, completed
    for frames in received:  # every feed: every stored event, once each, in stream order
        assert _seen(frames) == stored
    # The feeds' reads: each stored event once (the shared reader), not once per open feed
    # (before: `feeds` times each, 600 here); re-reads that find nothing more count for nothing.
    assert feeds_read == len(stored), (feeds_read, len(stored), feeds)


async def test_clients_of_one_execution_share_its_reads_and_each_gets_all_its_events_once(spear, http, monkeypatch):
    clients, tokens = 10, 40
    body = {
        **invoke_body("generate_text", "ASYNC", prompt="a b", tokens=tokens, delay_ms=50),
        "execution_id": "many-eyes",
    }
    read = events_read(monkeypatch, spear.names.execution_events("many-eyes"))
    async with http.post("/api/v1/invoke", json=body) as reply:
        assert reply.status == 202
    responses = [await http.get("/api/v1/executions/many-eyes/events", headers=SSE) for _ in range(clients)]
    try:
        received = await asyncio.wait_for(asyncio.gather(*(sse_frames(r) for r in responses)), 30)
        clients_read = sum(read)
    finally:
        for response in responses:
            response.close()
    stored = await _stored_since(spear, 0, spear.names.execution_events("many-eyes"))
    assert [kind for _, kind, _ in stored].count("chunk") == tokens and stored[-1][1] == "completed"
    for frames in received:
        assert _seen(frames) == stored
    # Each client reads what was stored before it joined (a few events) by itself; the rest is
    # read once for all of them (before: each client read every event, ~`clients` x 43).
    assert clients_read <= len(stored) + clients * 10, (clients_read, len(stored), clients)


async def test_a_feed_that_falls_behind_reads_by_itself_without_holding_up_the_others(spear, monkeypatch):
    """A feed whose client takes nothing while events come is given at most its queue's bound;
    the other feeds go on meanwhile; once it takes again, it reads what it missed from the
    stream by itself, and sends every event once, in order."""
    from spear.service import fanout  # (here: the tests above run against any version)

    monkeypatch.setattr(fanout, "MAX_QUEUED_EVENTS", 4)
    held: list[int] = []
    real_offer = fanout._Queue.offer

    def offer(queue, batch, size):  # type: ignore[no-untyped-def]
        real_offer(queue, batch, size)
        held.append(queue.count)

    monkeypatch.setattr(fanout._Queue, "offer", offer)
    service = spear.service
    fast, slow = service.follow_all(idle_s=30), service.follow_all(idle_s=30)
    assert await anext(fast) is None and await anext(slow) is None  # both open, nothing yet
    start = await service.stream.last_seq()
    fast_seen: list[int] = []

    async def take_fast(count: int) -> None:
        while len(fast_seen) < count:
            batch = await anext(fast)
            fast_seen.extend(shown.seq for shown in batch or ())

    calls = 8
    for n in range(calls):  # the slow feed takes nothing meanwhile
        async with asyncio.timeout(10):
            await spear.call(spear.nc, "invoke_function", invoke_body("echo", value=n))
            await take_fast(3 * (n + 1))  # the fast one is never held up by it
    subject = spear.names.event("*", "*", "*")
    stored = [seq for seq, _, _ in await _stored_since(spear, start, subject)]
    assert fast_seen == stored and len(stored) == 3 * calls
    assert max(held) <= 4  # the slow feed's queue stayed within its bound

    read = events_read(monkeypatch, subject)
    slow_seen: list[int] = []
    async with asyncio.timeout(10):
        while len(slow_seen) < len(stored):
            batch = await anext(slow)
            slow_seen.extend(shown.seq for shown in batch or ())
    assert slow_seen == stored  # each once, in order: what it held, then what it read by itself
    assert sum(read) > 0  # (it did read by itself)
    await fast.aclose()
    await slow.aclose()
    assert service.feeds.readers == {}  # the last feed gone, the shared reader ends


async def test_a_shared_reader_ends_with_its_last_feed_restarts_with_the_next_and_stops_with_the_service(spear):
    service = spear.service
    feed = service.follow_all(idle_s=30)
    assert await anext(feed) is None
    (reader,) = service.feeds.readers.values()
    await feed.aclose()
    assert service.feeds.readers == {}
    await asyncio.wait({reader.task}, timeout=5)
    assert reader.task.done()
    again = service.follow_all(idle_s=30)
    assert await anext(again) is None
    reply, _ = await spear.call(spear.nc, "invoke_function", invoke_body("echo", value="again"))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED
    kinds: list[str] = []
    async with asyncio.timeout(10):
        while len(kinds) < 3:
            kinds += [shown.event.kind for shown in await anext(again) or ()]
    assert kinds == ["requested", "started", "completed"]
    await service.feeds.stop()  # the service stops: its open feeds end (not keep-alives for ever)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(again), 5)
