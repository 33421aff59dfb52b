"""ListExecutions read from the stream's `requested` events (spear/service/listing.py): the
order executions were accepted in, whatever their ids; executions not projected yet; pages across
the walk's windows; filters bounded by the scan limit; an unknown cursor."""

import asyncio
import json

import pytest

from spear.core.enums import ExecutionStatus
from spear.projection.retention import expire
from spear.service import listing
from tests.conftest import invoke_body


async def _ids(spear, client, **request) -> tuple[list[str], dict]:
    page, _ = await spear.call(client, "list_executions", request)
    assert "executions" in page, page
    return [e["execution_id"] for e in page["executions"]], page


async def _every_page(spear, client, **request) -> list[str]:
    seen, cursor = [], ""
    while True:
        ids, page = await _ids(spear, client, **request, start_after=cursor)
        seen += ids
        if not page["has_more"]:
            return seen
        cursor = page["next_start_after"]


async def test_executions_are_listed_in_the_order_they_were_accepted_whatever_their_ids(spear, client):
    accepted = ["zz-first", "aa-second", "mm-third"]
    for execution_id in accepted:
        await spear.call(client, "invoke_function", {**invoke_body("echo", value=1), "execution_id": execution_id})
    ids, _ = await _ids(spear, client, task_id="demo")
    assert ids[:3] == accepted[::-1]  # newest first
    assert (await _ids(spear, client, task_id="demo", order="asc"))[0][-3:] == accepted
    assert await _every_page(spear, client, task_id="demo", limit=1, order="asc") == accepted


async def test_an_execution_the_projection_has_not_recorded_yet_is_listed_as_the_log_says(spear, client):
    """Listed from its `requested` event, its status brought up to the log's newest events: a
    list read right after a SYNC call's reply showed it PENDING (probe42: 111 of ~200)."""
    assert spear.worker is not None
    await spear.projection.stop()
    ended, _ = await spear.call(client, "invoke_function", invoke_body("sleep", ms=1))
    await spear.worker.stop()
    waiting, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=1))
    page, _ = await spear.call(client, "list_executions", {"task_id": "demo"})
    listed = {e["execution_id"]: e for e in page["executions"]}
    assert listed[ended["execution_id"]]["status"] == ExecutionStatus.COMPLETED
    assert listed[ended["execution_id"]]["completed_at"] == ended["result"]["completed_at"]
    assert listed[waiting["execution_id"]]["status"] == ExecutionStatus.PENDING
    assert listed[waiting["execution_id"]]["function_name"] == "sleep"
    filtered, _ = await spear.call(client, "list_executions", {"task_id": "demo", "status_filter": "COMPLETED"})
    assert ended["execution_id"] in [e["execution_id"] for e in filtered["executions"]]


async def test_pages_span_the_walks_windows_in_both_orders(spear, client, monkeypatch):
    monkeypatch.setattr(listing, "WINDOW_PER_EXECUTION", 1)  # a few events per window: many windows
    monkeypatch.setattr(listing, "HELD_AT_ONCE", 1)
    accepted = []
    for n in range(7):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        accepted.append(reply["execution_id"])
    await spear.caught_up()
    assert await _every_page(spear, client, task_id="demo", limit=3) == accepted[::-1]
    assert await _every_page(spear, client, task_id="demo", limit=3, order="asc") == accepted
    assert (await _ids(spear, client, task_id="demo", limit=2, start_after=accepted[4]))[0] == accepted[3:1:-1]


async def test_a_filter_looks_at_a_bounded_number_of_executions_per_call(spear, client, monkeypatch):
    monkeypatch.setattr(listing, "SCAN_LIMIT", 3)
    monkeypatch.setattr(listing, "WINDOW_PER_EXECUTION", 1)
    failed, accepted = [], []
    for n in range(8):
        function = "fail" if n in (1, 6) else "echo"
        body = invoke_body(function) if function == "fail" else invoke_body("echo", value=n)
        reply, _ = await spear.call(client, "invoke_function", body)
        accepted.append(reply["execution_id"])
        if function == "fail":
            failed.append(reply["execution_id"])
    await spear.caught_up()
    ids, page = await _ids(spear, client, task_id="demo", status_filter="FAILED", limit=5)
    # it looked at the three newest (7, 6, 5), found 6 among them, and says where it stopped
    assert ids == [accepted[6]] and page["has_more"] and page["next_start_after"] == accepted[5]
    assert await _every_page(spear, client, task_id="demo", status_filter="FAILED", limit=5) == failed[::-1]
    by_function = await _every_page(spear, client, task_id="demo", function_name="fail", order="asc")
    assert by_function == failed


async def test_a_cursor_naming_no_execution_is_refused_clearly(spear, client):
    reply, headers = await spear.call(client, "list_executions", {"start_after": "never-accepted"})
    assert reply["error_code"] == "INVALID_ARGUMENT" and "never-accepted" in reply["message"]
    assert headers["Nats-Service-Error-Code"] == "400"


@pytest.mark.parametrize("order", ["desc", "asc"])
async def test_a_task_with_no_executions_lists_none(spear, client, order):
    await spear.call(client, "invoke_function", invoke_body("echo", value=1))
    assert await _ids(spear, client, task_id="nothing-here", order=order) == (
        [],
        {"executions": [], "has_more": False, "next_start_after": ""},
    )


async def test_a_cursor_that_expired_meanwhile_goes_on_where_it_was(spear, client):
    """The last execution of a page (the oldest, newest first) is the next one retention
    removes: its expired marker says where its `requested` was, and the walk goes on from there
    exactly, whatever its id (a client's own, or a ULID made in the same millisecond as others)."""
    accepted = []
    for n in range(5):
        body = {**invoke_body("echo", value=n), **({"execution_id": f"mine-{n}"} if n == 3 else {})}
        reply, _ = await spear.call(client, "invoke_function", body)
        accepted.append(reply["execution_id"])
    await spear.caught_up()
    ids, page = await _ids(spear, client, task_id="demo", limit=2)
    assert ids == accepted[:2:-1] and page["next_start_after"] == accepted[3] == "mine-3"
    await _expire(spear, accepted[3])
    ids, _ = await _ids(spear, client, task_id="demo", limit=2, start_after=accepted[3])
    assert ids == [accepted[2], accepted[1]]
    ids, _ = await _ids(spear, client, task_id="demo", limit=2, start_after=accepted[3], order="asc")
    assert ids == [accepted[4]]


async def test_a_cursor_whose_marker_is_gone_too_is_placed_by_the_time_in_its_ulid(spear, client):
    accepted = []
    for n in range(4):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        accepted.append(reply["execution_id"])
        await asyncio.sleep(0.005)  # a millisecond of its own each
    await spear.caught_up()
    await _expire(spear, accepted[2])
    await spear.service.state_kv.purge(spear.names.expired_key(accepted[2]))  # the marker's time is up too
    ids, _ = await _ids(spear, client, task_id="demo", limit=5, start_after=accepted[2])
    assert ids == [accepted[1], accepted[0]]
    ids, _ = await _ids(spear, client, task_id="demo", limit=5, start_after=accepted[2], order="asc")
    assert ids == [accepted[3]]


async def test_a_cursor_with_an_older_versions_marker_and_no_time_in_its_id_is_placed_by_its_end(spear, client):
    # Markers written before they said where the `requested` was (an upgrade, probe16) and a
    # client-chosen id: newest first, what was accepted before the execution ended; oldest
    # first, from the oldest execution kept (some listed again, none left out).
    accepted = [f"k-{n}" for n in range(4)]
    for execution_id in accepted:
        await spear.call(client, "invoke_function", {**invoke_body("echo", value=1), "execution_id": execution_id})
        # Placed by the millisecond it ended: one accepted in that millisecond too is listed
        # again (by design); the next one comes a millisecond later, as it would between callers.
        await asyncio.sleep(0.005)
    await _expire(spear, "k-1")
    key = spear.names.expired_key("k-1")
    marker = json.loads((await spear.service.state_kv.get(key)).value)
    del marker["requested_seq"]
    await spear.service.state_kv.put(key, json.dumps(marker).encode())
    assert (await _ids(spear, client, task_id="demo", start_after="k-1"))[0] == ["k-0"]
    assert (await _ids(spear, client, task_id="demo", start_after="k-1", order="asc"))[0] == ["k-0", "k-2", "k-3"]


async def test_executions_with_big_parameters_are_all_listed(spear, client):
    """Their `requested` events fill a batch's bytes long before its count: the walk reads on."""
    accepted = []
    for _ in range(12):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", "ASYNC", value="x" * 400_000))
        assert reply["success"] is True, reply
        accepted.append(reply["execution_id"])
    assert await _every_page(spear, client, task_id="demo", limit=5) == accepted[::-1]
    assert await _every_page(spear, client, task_id="demo", limit=20, order="asc") == accepted


async def test_a_cursor_with_a_time_no_date_can_hold_is_refused_not_an_internal_error(spear, client):
    reply, _ = await spear.call(client, "list_executions", {"start_after": "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"})
    assert reply["error_code"] == "INVALID_ARGUMENT", reply


async def _expire(spear, execution_id: str) -> None:
    """Remove the execution as retention does (its events and state; its marker stays)."""
    state = await spear.service.execution_state(execution_id)
    await expire(spear.nc, spear.names, spear.service.state_kv, state, 60, 5.0)


async def test_a_walk_ends_at_the_oldest_message_the_stream_still_holds(spear, client, monkeypatch):
    # Retention removed the old end of the stream: thousands of sequences hold nothing now. The
    # newest-first walk stops at the oldest message left instead of reading windows down to 1.
    js = client.jetstream()
    for n in range(3000):
        await js.publish(spear.names.append("filler", f"f{n}", "log"), b"{}")
    purge = {"filter": spear.names.event("filler", "*", "*")}
    await client.request(f"$JS.API.STREAM.PURGE.{spear.names.stream}", json.dumps(purge).encode(), timeout=5)
    accepted = []
    for n in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        accepted.append(reply["execution_id"])
    reads = []
    real_read_batch = listing.directget.read_batch

    async def counted_read_batch(*args, **kwargs):
        reads.append(args[3])  # the start of each read
        return await real_read_batch(*args, **kwargs)

    monkeypatch.setattr(listing.directget, "read_batch", counted_read_batch)
    for task_id in ("", "demo"):
        reads.clear()
        assert (await _ids(spear, client, task_id=task_id))[0] == accepted[::-1]
        assert len(reads) <= 2, reads


async def test_a_task_whose_executions_are_far_back_is_found_in_one_jump(spear, client, monkeypatch):
    # Thousands of other events after the task's last execution: the walk from the stream's end
    # meets none of its executions in the first window, and jumps to its newest `requested`.
    accepted = []
    for n in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        accepted.append(reply["execution_id"])
    js = client.jetstream()
    for n in range(3000):
        await js.publish(spear.names.append("filler", f"f{n}", "log"), b"{}")
    reads = []
    real_read_batch = listing.directget.read_batch

    async def counted_read_batch(*args, **kwargs):
        reads.append(args[3])
        return await real_read_batch(*args, **kwargs)

    monkeypatch.setattr(listing.directget, "read_batch", counted_read_batch)
    assert (await _ids(spear, client, task_id="demo", limit=5))[0] == accepted[::-1]
    assert len(reads) <= 2, reads  # the window at the end, then the one at the task's newest


def _filters_read(monkeypatch) -> list[str]:
    """The subject filter of every batch the walks read from now on, in order."""
    filters: list[str] = []
    read_batch = listing.directget.read_batch

    async def spied(nc, stream, subject_filter, start, timeout, count=listing.directget.BATCH, **bounds):
        filters.append(subject_filter)
        return await read_batch(nc, stream, subject_filter, start, timeout, count, **bounds)

    monkeypatch.setattr(listing.directget, "read_batch", spied)
    return filters


async def test_oldest_first_reads_every_event_while_dense_and_lets_the_server_filter_once_sparse(
    spear, client, monkeypatch
):
    """A subject-filtered read costs the server a look at every subject its filter matches (73 ms a
    page with 300,000 executions, 5 ms read unfiltered): oldest first reads batches of every event
    while they hold enough `requested` ones, and lets the server filter where they are sparse."""
    filters = _filters_read(monkeypatch)
    accepted = []
    for n in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        accepted.append(reply["execution_id"])
    assert await _every_page(spear, client, task_id="demo", limit=2, order="asc") == accepted
    assert await _every_page(spear, client, limit=2, order="asc") == accepted
    assert filters and set(filters) == {">"}  # dense: never filtered by the server

    # one execution of 600 chunks: the batches after the first hold no `requested` at all
    streamed, _ = await spear.call(
        client, "invoke_function", invoke_body("generate_text", "STREAM", prompt="x", tokens=600)
    )
    await _until_ended(spear, client, streamed["execution_id"])
    for n in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        accepted.append(reply["execution_id"])
    accepted.insert(3, streamed["execution_id"])
    filters.clear()
    assert await _every_page(spear, client, task_id="demo", limit=100, order="asc") == accepted
    assert filters[0] == ">" and filters[-1] == spear.names.event("demo", "*", "requested"), filters


async def _until_ended(spear, client, execution_id: str) -> None:
    for _ in range(200):
        status, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
        if status["execution"]["status"] == ExecutionStatus.COMPLETED:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{execution_id} did not end: {status}")


async def test_oldest_first_lets_the_server_filter_where_events_are_big(spear, client, monkeypatch):
    """Dense by count is not enough: events of big results read unfiltered would bring the gateway
    every byte of them (a review: 270 MB for one call). A batch cut short by its byte bound makes
    the walk filter from there on."""
    filters = _filters_read(monkeypatch)
    accepted = []
    for n in range(4):  # each ~200 KB in and out: a batch of every event stops after about one
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=f"{n}" * 200_000))
        accepted.append(reply["execution_id"])
    assert await _every_page(spear, client, task_id="demo", limit=10, order="asc") == accepted
    assert filters[0] == ">" and set(filters[1:]) == {spear.names.event("demo", "*", "requested")}, filters


@pytest.mark.parametrize(
    ("subject", "task_id", "wanted"),
    [
        ("p.exec.demo.e1.requested", "", True),
        ("p.exec.demo.e1.requested", "demo", True),
        ("p.exec.demo.e1.requested", "other", False),
        ("p.exec.demo.e1.cancel_requested", "", False),
        ("p.exec.demo.e1.completed", "", False),
        ("p.exec.x.demo.e1.requested", "demo", False),  # another depth: the server's filter takes none
        ("p.exec.demo.requested", "", False),
    ],
)
def test_what_an_unfiltered_read_keeps_is_what_the_subject_filter_takes(subject, task_id, wanted):
    assert listing._is_requested(subject, task_id) is wanted


async def test_a_task_with_few_executions_among_many_is_read_at_once_in_both_orders(served, client, monkeypatch):
    """A task whose executions are few and far between was found window by window (a probe: 4.4 s
    a page); once a window holds none of them, all of them are read at once (`multi_last`)."""
    from tests.conftest import call_body

    monkeypatch.setattr(listing, "WINDOW_PER_EXECUTION", 1)  # small windows: the gap spans several
    monkeypatch.setattr(listing, "HELD_AT_ONCE", 1)
    asked: list[dict] = []
    read_request = listing.directget.read_request

    async def spied(nc, stream, request, timeout):
        asked.append(request)
        return await read_request(nc, stream, request, timeout)

    monkeypatch.setattr(listing.directget, "read_request", spied)
    first, _ = await served.call(client, "invoke_function", call_body("add", a=1))
    for n in range(90):  # 270 events of another task: more than a batch of every event
        await served.call(client, "invoke_function", invoke_body("echo", value=n))
    last, _ = await served.call(client, "invoke_function", call_body("add", a=2))
    own = [first["execution_id"], last["execution_id"]]
    await served.caught_up()

    for order, limit in (("desc", 5), ("desc", 1), ("asc", 5), ("asc", 1)):
        asked.clear()
        listed = await _every_page(served, client, task_id="own", limit=limit, order=order)
        assert listed == (own[::-1] if order == "desc" else own), (order, limit, listed)
        assert any("multi_last" in request for request in asked), (order, limit)

    monkeypatch.setattr(listing.directget, "BATCH", 1)  # "too many at once": the walk goes on by windows
    assert await _every_page(served, client, task_id="own", limit=5) == own[::-1]
    assert await _every_page(served, client, task_id="own", limit=1, order="asc") == own


async def test_a_running_execution_is_listed_when_every_newer_one_has_expired(spear, client):
    """A probe: once every execution accepted after a running one had expired, the default list
    (newest first) was empty, while oldest first and a status filter found it."""
    running, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=3000))
    ended = []
    for n in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
        ended.append(reply["execution_id"])
    await spear.caught_up()
    for execution_id in ended:
        await _expire(spear, execution_id)
    for request in ({}, {"limit": 1}, {"task_id": "demo"}, {"order": "asc"}):
        ids, _ = await _ids(spear, client, **request)
        assert ids == [running["execution_id"]], (request, ids)
