"""The HTTP API through real HTTP against a real server: every route, status code and error body."""

import asyncio
import contextlib
import json
import logging
import re
import socket
import struct
import time
import urllib.parse
from contextlib import AsyncExitStack

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from spear.cli import components
from spear.core import contract
from spear.core.config import with_overrides
from spear.core.enums import ExecutionStatus
from spear.service.operations import Service
from tests.conftest import has_status, invoke_body, spear_on_its_own_nats, sse_frames
from tests.processes import free_port


@pytest_asyncio.fixture
async def http(spear):
    port = free_port()
    async with AsyncExitStack() as stack:
        await components.start_http(stack, spear.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session


async def _post(http, path, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = kwargs.pop("headers", {"Content-Type": "application/json"})
    async with http.post(path, data=data, headers=headers, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def _get(http, path, **kwargs):
    async with http.get(path, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def test_sync_invoke_is_200_with_the_result(http):
    status, body, _ = await _post(
        http, "/api/v1/invoke", invoke_body("extract_keywords", text="the cat and the cat hat")
    )
    assert status == 200
    assert body["result"]["status"] == ExecutionStatus.COMPLETED
    assert body["result"]["result"] == ["the", "cat", "and", "hat"]


async def test_async_invoke_is_202_with_location_that_answers(http):
    status, body, headers = await _post(http, "/api/v1/invoke", invoke_body("validate_email", "ASYNC", email="a@b.io"))
    assert status == 202
    assert headers["Location"] == f"/api/v1/execution/{body['execution_id']}/status" == body["status_endpoint"]
    for _ in range(100):
        status, state, _ = await _get(http, headers["Location"])
        assert status == 200 and state["found"] is True
        if state["result"]["status"] == ExecutionStatus.COMPLETED:
            break
        await asyncio.sleep(0.02)
    assert state["result"]["result"] == {"email": "a@b.io", "valid": True}
    status, state, _ = await _get(http, headers["Location"] + "?include_result=false")
    assert status == 200 and state["result"]["result"] is None
    assert state["result"]["status"] == ExecutionStatus.COMPLETED


@pytest.mark.parametrize("mode", ["ASYNC", "STREAM"])
async def test_an_invoke_answered_later_asked_again_is_202_with_location_whatever_its_state(spear, http, mode):
    """A client asking again after a lost reply (the same execution_id) gets what the first call
    gave: a probe got 200 with no Location once the execution had started."""
    body = {**invoke_body("echo", mode, value=1), "execution_id": f"asked-twice-{mode}"}
    status, first, headers = await _post(http, "/api/v1/invoke", body)
    assert status == 202 and headers["Location"] == first["status_endpoint"]
    await spear.status_until(spear.nc, f"asked-twice-{mode}", has_status(ExecutionStatus.COMPLETED))
    status, again, headers = await _post(http, "/api/v1/invoke", body)
    assert status == 202 and headers["Location"] == first["status_endpoint"], (status, again)
    assert again["message"] == "Execution already exists" and again["result"]["status"] == ExecutionStatus.COMPLETED


@pytest.mark.parametrize(
    "path, body, headers, status, code",
    [
        ("/api/v1/invoke", "{not json", None, 400, "INVALID_ARGUMENT"),
        ("/api/v1/invoke", "[1]", None, 400, "INVALID_ARGUMENT"),
        ("/api/v1/invoke", {"task_id": "a.b", "function_name": "echo"}, None, 400, "INVALID_ARGUMENT"),
        (
            "/api/v1/invoke",
            {"task_id": "demo", "function_name": "echo"},
            {"Content-Type": "text/plain"},
            400,
            "INVALID_ARGUMENT",
        ),
        ("/api/v1/invoke", {"task_id": "nope", "function_name": "echo"}, None, 404, "NOT_FOUND"),
        (
            "/api/v1/invoke",
            {"task_id": "demo", "function_name": "echo", "pad": "x" * 1_100_000},
            None,
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ],
)
async def test_invoke_errors_use_the_contract_status_and_body(http, path, body, headers, status, code):
    got_status, got, _ = await _post(http, path, body, headers=headers or {"Content-Type": "application/json"})
    assert got_status == status
    assert got["success"] is False and got["error_code"] == code and got["message"]


async def test_a_declared_body_over_the_limit_is_413_at_once(http):
    """Said before the body is read: one that never comes was 400 after the body timeout (probe19)."""
    reader, writer = await asyncio.open_connection(http._base_url.host, http._base_url.port)
    try:
        head = b"POST /api/v1/invoke HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        writer.write(head + b"Content-Length: 500000000\r\n\r\n{")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)  # well within the body timeout
        assert answer.startswith(b"HTTP/1.1 413 "), answer
    finally:
        writer.close()


async def test_reused_execution_id_for_another_request_is_409(http):
    first = {**invoke_body("echo", value=1), "execution_id": "http-key"}
    assert (await _post(http, "/api/v1/invoke", first))[0] == 200
    status, body, _ = await _post(http, "/api/v1/invoke", {**first, "parameters": [{"name": "value", "value": 2}]})
    assert status == 409 and body["error_code"] == "ALREADY_EXISTS"


async def test_unknown_execution_is_404_found_false_and_bad_ids_400(http):
    for path in ("/api/v1/execution/nobody/status", "/api/v1/executions/nobody"):
        status, body, _ = await _get(http, path)
        assert status == 404 and body["found"] is False and body["error_code"] == "NOT_FOUND", path
    status, body, _ = await _get(http, "/api/v1/executions/a.b")
    assert status == 400 and body["message"].startswith("execution_id must be 1 to 128 letters, digits, '_' or '-'")
    status, body, _ = await _get(http, "/api/v1/execution/a.b/status")
    assert status == 400 and body["error_code"] == "INVALID_ARGUMENT"
    status, body, _ = await _get(http, "/api/v1/execution/x/status?include_result=maybe")
    assert status == 400
    # the events route is a get endpoint too, as a list and as SSE (probe50: `success: false`)
    status, body, _ = await _get(http, "/api/v1/executions/nobody/events")
    assert status == 404 and body["found"] is False and body["error_code"] == "NOT_FOUND", body
    assert "success" not in body and body["events"] == [] and "nobody" in body["message"], body  # as over NATS
    async with http.get("/api/v1/executions/nobody/events", headers={"Accept": "text/event-stream"}) as response:
        body = await response.json()
        assert response.status == 404 and body["found"] is False and body["error_code"] == "NOT_FOUND", body


async def test_wrong_method_is_405_and_unknown_route_404(http):
    async with http.delete("/api/v1/invoke") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["success"] is False
    status, body, _ = await _get(http, "/api/v1/nowhere")
    assert status == 404 and body["error_code"] == "NOT_FOUND"


async def test_every_get_route_answers_head_with_its_headers_and_no_body(http):
    _, accepted, _ = await _post(http, "/api/v1/invoke", invoke_body("echo", value=1))
    execution_id = accepted["execution_id"]
    for path in ("/api/v1/health", "/", f"/api/v1/executions/{execution_id}", "/api/v1/executions"):
        async with http.get(path) as got, http.head(path) as head:
            assert head.status == got.status == 200, path
            assert head.headers["Content-Type"] == got.headers["Content-Type"], path
            assert await head.read() == b"", path
    # a HEAD that asks for the event stream gets the JSON reply's headers, not a stream held open
    sse = {"Accept": "text/event-stream"}
    async with http.head(f"/api/v1/executions/{execution_id}/events", headers=sse) as head:
        assert head.status == 200 and head.headers["Content-Type"].startswith("application/json")
    async with http.head("/api/v1/invoke") as head:
        assert head.status == 405 and head.headers["Allow"] == "POST"


async def test_media_types_in_accept_are_matched_whatever_their_case(http):
    _, accepted, _ = await _post(http, "/api/v1/invoke", invoke_body("echo", value=1))
    path = f"/api/v1/executions/{accepted['execution_id']}/events"
    async with http.get(path, headers={"Accept": "TEXT/EVENT-STREAM"}) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert b"event: completed" in await asyncio.wait_for(response.read(), 10)


@pytest.mark.parametrize(
    "accept, streamed",
    [
        ("application/json, text/event-stream;q=0.1", False),  # (probe29: each of these three streamed)
        ("text/event-stream;q=0, application/json", False),
        ("text/event-stream;q=0", False),
        ("*/*", False),
        ("", False),
        ("text/event-stream", True),
        ("application/json;q=0.5, text/event-stream", True),
        ("text/event-stream; charset=utf-8, */*;q=0.8", True),
    ],
)
async def test_the_event_stream_is_sent_only_to_a_client_that_ranks_it_first(http, accept, streamed):
    _, accepted, _ = await _post(http, "/api/v1/invoke", invoke_body("echo", value=1))
    path = f"/api/v1/executions/{accepted['execution_id']}/events"
    async with http.get(path, headers={"Accept": accept}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream" if streamed else "application/json")
        await asyncio.wait_for(response.read(), 10)


@pytest.mark.parametrize(
    "accept",
    [
        "application/json;q=0.5, */*, text/event-stream;q=0.8",  # JSON 0.5: */* does not raise it
        "text/event-stream;q=0.5, application/*;q=0.4, */*",
        "application/json;q=0, */*;q=0.9, text/event-stream;q=0.5",  # JSON refused outright
    ],
)
async def test_json_is_ranked_by_the_most_specific_range_that_names_it(http, accept):
    """review24: 8a531ef ranked JSON by the highest of application/json, application/* and */*: a more
    specific range overrides a less specific one (RFC 9110 §12.5.1), so these clients, which rank
    the event stream above JSON (or refuse JSON), got JSON."""
    _, accepted, _ = await _post(http, "/api/v1/invoke", invoke_body("echo", value=1))
    path = f"/api/v1/executions/{accepted['execution_id']}/events"
    async with http.get(path, headers={"Accept": accept}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream"), response.headers["Content-Type"]
        await asyncio.wait_for(response.read(), 10)


async def test_events_list_the_history_in_order(http):
    _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("fail", message="no"))
    status, events, _ = await _get(http, f"/api/v1/executions/{body['execution_id']}/events")
    assert status == 200
    assert [e["type"] for e in events] == ["requested", "started", "failed"]
    assert events[-1]["result"]["error_code"] == "FUNCTION_ERROR"


async def test_sse_joined_mid_execution_replays_then_follows_live_until_the_end(spear, http):
    _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=700))
    execution_id = body["execution_id"]
    for _ in range(100):
        _, state, _ = await _get(http, f"/api/v1/execution/{execution_id}/status")
        if state["result"]["status"] == ExecutionStatus.RUNNING:
            break
        await asyncio.sleep(0.02)
    assert state["result"]["status"] == ExecutionStatus.RUNNING  # joined mid-execution
    headers = {"Accept": "text/event-stream"}
    # resuming past its last event is refused, not waited on for ever (probe55: keep-alives only)
    past = {**headers, "Last-Event-ID": "99999999"}
    status, body, _ = await _get(http, f"/api/v1/executions/{execution_id}/events", headers=past)
    assert status == 400 and "past execution" in body["message"], body
    async with http.get(f"/api/v1/executions/{execution_id}/events", headers=headers) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        frames = await asyncio.wait_for(sse_frames(response), 10)
    assert [f["event"] for f in frames] == ["requested", "started", "completed"]
    assert [int(f["id"]) for f in frames] == sorted(int(f["id"]) for f in frames)
    assert json.loads(frames[-1]["data"])["result"]["result"] == 700
    resume = {**headers, "Last-Event-ID": frames[0]["id"]}
    async with http.get(f"/api/v1/executions/{execution_id}/events", headers=resume) as response:
        resumed = await asyncio.wait_for(sse_frames(response), 10)
    assert [f["event"] for f in resumed] == ["started", "completed"]
    for wrong in ("abc", "99999999999999999999"):  # (20 digits past 2^64 - 1 waited for ever: probe57)
        bad = {**headers, "Last-Event-ID": wrong}
        status, body, _ = await asyncio.wait_for(
            _get(http, f"/api/v1/executions/{execution_id}/events", headers=bad), 10
        )
        assert status == 400 and "below 2^64" in body["message"], (wrong, body)


async def test_executions_list_filters_and_pages(spear, http):
    ids = []
    for n in range(5):
        _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("calculate_fibonacci", n=n))
        ids.append(body["execution_id"])
    _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("fail"))
    failed_id = body["execution_id"]
    await spear.caught_up()
    everything = sorted([*ids, failed_id])
    for order, expected in (("", everything[::-1]), ("&order=desc", everything[::-1]), ("&order=asc", everything)):
        seen, start_after = [], ""
        while True:
            query = f"limit=2&task_id=demo&start_after={start_after}{order}"
            status, page, _ = await _get(http, f"/api/v1/executions?{query}")
            assert status == 200 and len(page["executions"]) <= 2
            seen += [e["execution_id"] for e in page["executions"]]
            if not page["has_more"]:
                break
            start_after = page["next_start_after"]
        assert seen == expected, order  # newest first unless asked otherwise; paging in both orders
    status, page, _ = await _get(http, "/api/v1/executions?function_name=calculate_fibonacci&order=asc&limit=3")
    assert [e["execution_id"] for e in page["executions"]] == ids[:3] and page["next_start_after"] == ids[2]
    for failed in ("failed", "EXECUTION_STATUS_FAILED", "4"):  # (its number too, as NATS takes it: probe28)
        status, page, _ = await _get(http, f"/api/v1/executions?status={failed}")
        assert [e["execution_id"] for e in page["executions"]] == [failed_id], failed
    assert page["executions"][0]["error_message"].startswith("RuntimeError")
    status, page, _ = await _get(http, "/api/v1/executions?task_id=other")
    assert page["executions"] == []
    for unset in ("limit=0", "limit=", "task_id=&status=&limit=&start_after="):  # proto3's zero, a template
        status, page, _ = await _get(http, f"/api/v1/executions?{unset}")
        assert status == 200 and len(page["executions"]) == 6, unset  # the default limit (100)
    bad_queries = ("status=SOMETIMES", "status=99", "limit=lots", "limit=-1", "task_id=a.b", "order=up")
    for bad in (*bad_queries, "function_name=a b"):
        status, body, _ = await _get(http, f"/api/v1/executions?{bad}")
        assert status == 400 and body["error_code"] == "INVALID_ARGUMENT", bad


async def test_tasks_health_stats_and_metrics(spear, http):
    before = await _metrics(http)  # the counters are per process: earlier tests counted too
    await _post(http, "/api/v1/invoke", invoke_body("echo", value=None))
    await _post(http, "/api/v1/invoke", invoke_body("fail"))
    await spear.caught_up()
    status, tasks, _ = await _get(http, "/api/v1/tasks?include_details=true")
    assert status == 200 and [t["task_id"] for t in tasks["tasks"]] == ["demo"]
    assert tasks["tasks"][0]["execution_count"] == 2
    assert "calculate_fibonacci" in {f["name"] for f in tasks["tasks"][0]["functions"]}
    status, task, _ = await _get(http, "/api/v1/tasks/demo?include_executions=true")
    assert status == 200 and task["found"] and len(task["executions"]) == 2
    status, task, _ = await _get(http, "/api/v1/tasks/ghost")
    assert status == 404 and task["found"] is False
    status, health, _ = await _get(http, "/api/v1/health?include_details=true")
    assert status == 200 and health["status"] == "healthy"
    assert health["details"]["total_executions"] == 2
    status, stats, _ = await _get(http, "/api/v1/stats")
    assert status == 200
    assert stats["execution_stats"]["completed_executions"] == 1
    assert stats["execution_stats"]["failed_executions"] == 1
    assert stats["execution_stats"]["success_rate_percent"] == 50.0
    assert stats["service_stats"]["total_tasks"] == 1
    assert 0 < stats["service_stats"]["memory_usage_percent"] < 100  # this process's share of the machine
    [demo] = stats["task_stats"]["most_active_tasks"]
    assert demo["task_id"] == "demo" and demo["workers"] == [spear.worker.worker_id]  # who serves it now
    after = await _metrics(http)
    invoked = {"operation": "invoke_function", "transport": "http", "code": "OK"}  # (its name over NATS too)
    assert _sample(after, "spear_requests_total", **invoked) - _sample(before, "spear_requests_total", **invoked) == 2
    # an error reply is counted under its contract code, as the NATS gateway counts it (not "404")
    not_found = {"operation": "get_task", "transport": "http", "code": "NOT_FOUND"}
    assert (
        _sample(after, "spear_requests_total", **not_found) - _sample(before, "spear_requests_total", **not_found) == 1
    )
    assert not any(s.labels.get("code") == "404" for f in after for s in f.samples if s.name == "spear_requests_total")
    for function in ("echo", "fail"):
        labels = {"task_id": "demo", "function_name": function}
        finished = _sample(after, "spear_executions_finished_total", **labels)
        assert finished - _sample(before, "spear_executions_finished_total", **labels) == 1, function


async def _metrics(http) -> list:
    async with http.get("/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        return list(text_string_to_metric_families(await response.text()))


def _sample(families: list, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_an_unhealthy_answer_is_counted_under_its_error_code_not_503(settings, tmp_path):
    """probe67: with NATS stopped, GET /api/v1/health answered 503 UNAVAILABLE and /metrics counted
    it as code="503": the label is OK or the contract's error code (observability/README.md)."""
    async with spear_on_its_own_nats(settings, tmp_path / "nats") as own:
        port = free_port()
        await components.start_http(own.stack, own.running.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            before = await _metrics(http)
            await own.lose()
            status, health, _ = await _get(http, "/api/v1/health")
            assert status == 503 and health["error_code"] == "UNAVAILABLE", health
            after = await _metrics(http)
            await own.regain()
    unhealthy = {"operation": "get_health", "transport": "http", "code": "UNAVAILABLE"}
    assert (
        _sample(after, "spear_requests_total", **unhealthy) - _sample(before, "spear_requests_total", **unhealthy) == 1
    )
    codes = {s.labels["code"] for f in after for s in f.samples if s.name == "spear_requests_total"}
    assert not [code for code in codes if code.isdigit()], codes


async def test_cancel_route(http):
    _, running, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=10000))
    path = f"/api/v1/executions/{running['execution_id']}/cancel"
    await _status_of(http, running["execution_id"], ExecutionStatus.RUNNING)
    status, body, _ = await _post(http, path, {"reason": "from http"})
    assert status == 200 and body["success"] is True and body["final_status"] == ExecutionStatus.CANCELLED
    status, body, _ = await _post(http, path, b"", headers={})  # no body at all is fine too
    assert status == 409 and body["error_code"] == "FAILED_PRECONDITION"
    assert body["final_status"] == ExecutionStatus.CANCELLED
    status, body, _ = await _post(http, "/api/v1/executions/nobody/cancel", {})
    assert status == 404 and body["error_code"] == "NOT_FOUND"
    status, body, _ = await _post(http, path, "[1]")
    assert status == 400


async def test_a_cancel_whose_body_names_another_execution_is_refused(http):
    """The path names the execution; a body naming another is refused, and neither is cancelled
    (probe26: the path's was cancelled, the mismatch unsaid). The same id in both is fine."""
    _, running, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=10000))
    _, other, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=10000))
    path = f"/api/v1/executions/{running['execution_id']}/cancel"
    status, body, _ = await _post(http, path, {"execution_id": other["execution_id"]})
    assert status == 400 and body["error_code"] == "INVALID_ARGUMENT" and other["execution_id"] in body["message"]
    for execution in (running, other):
        _, state, _ = await _get(http, f"/api/v1/execution/{execution['execution_id']}/status")
        assert state["result"]["status"] != ExecutionStatus.CANCELLED
    status, body, _ = await _post(http, path, {"execution_id": running["execution_id"], "force": True})
    assert status == 200 and body["final_status"] == ExecutionStatus.CANCELLED
    await _post(http, f"/api/v1/executions/{other['execution_id']}/cancel", {"force": True})


async def test_canonical_status_route_and_alias_answer_the_same(http):
    _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("quick_calculation", input=21))
    execution_id = body["execution_id"]
    _, canonical, _ = await _get(http, f"/api/v1/executions/{execution_id}?include_logs=true")
    _, alias, _ = await _get(http, f"/api/v1/execution/{execution_id}/status?include_logs=true")
    assert canonical == alias and canonical["result"]["result"] == 42
    _, bare, _ = await _get(http, f"/api/v1/executions/{execution_id}?include_result=false")
    assert bare["result"]["result"] is None and bare["execution"]["status"] == ExecutionStatus.COMPLETED
    assert bare["result"]["status"] == ExecutionStatus.COMPLETED


async def test_messages_state_the_id_rule_not_a_regex(http):
    status, body, _ = await _post(http, "/api/v1/invoke", {"task_id": "demo", "function_name": "no way"})
    assert status == 400
    assert body["message"] == "function_name must be 1 to 128 letters, digits, '_' or '-'"
    status, body, _ = await _get(http, "/api/v1/executions?task_id=a.b")
    assert "task_id must be empty or 1 to 128 letters, digits, '_' or '-'" in body["message"]
    assert "[" not in body["message"] and "regex" not in body["message"]


async def _status_of(http, execution_id, wanted):
    for _ in range(200):
        _, state, _ = await _get(http, f"/api/v1/executions/{execution_id}")
        if state["result"]["status"] == wanted:
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"{execution_id} never reached {wanted}: {state}")


async def test_cancelled_executions_report_the_time_from_start_to_cancel(spear, http):
    _, running, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=10000))
    await _status_of(http, running["execution_id"], ExecutionStatus.RUNNING)
    await asyncio.sleep(0.2)  # it runs a measurable while before it is cancelled
    status, reply, _ = await _post(http, f"/api/v1/executions/{running['execution_id']}/cancel", {})
    assert status == 200 and reply["final_status"] == ExecutionStatus.CANCELLED
    state = await _status_of(http, running["execution_id"], ExecutionStatus.CANCELLED)
    result = state["result"]
    elapsed = contract.parse_timestamp(result["completed_at"]) - contract.parse_timestamp(result["started_at"])
    assert result["execution_time_ms"] >= 200 and abs(result["execution_time_ms"] - elapsed * 1000) <= 2
    await spear.caught_up()
    _, listed, _ = await _get(http, "/api/v1/executions?status=cancelled")
    assert listed["executions"][0]["execution_time_ms"] == result["execution_time_ms"]
    assert listed["executions"][0]["worker_id"] == spear.worker.worker_id

    # never started: cancelled while pending, so no time at all
    await spear.worker.stop()  # nobody takes work now: invocations stay pending
    _, pending, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=10))
    status, reply, _ = await _post(http, f"/api/v1/executions/{pending['execution_id']}/cancel", {})
    assert status == 200 and reply["final_status"] == ExecutionStatus.CANCELLED
    state = await _status_of(http, pending["execution_id"], ExecutionStatus.CANCELLED)
    assert state["result"]["execution_time_ms"] == 0 and state["result"]["started_at"] is None


async def test_workers_route_lists_each_worker_with_its_tasks_and_running_executions(spear, http):
    _, running, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=3000))
    await _status_of(http, running["execution_id"], ExecutionStatus.RUNNING)
    await spear.caught_up()
    status, body, _ = await _get(http, "/api/v1/workers")
    assert status == 200
    (worker,) = body["workers"]
    assert worker["worker_id"] == spear.worker.worker_id and worker["tasks"] == ["demo"]
    assert worker["running_executions"] == [running["execution_id"]]
    status, body, _ = await _get(http, "/api/v1/workers?task_id=other")
    assert status == 200 and body["workers"] == []
    await _post(http, f"/api/v1/executions/{running['execution_id']}/cancel", {"force": True})


async def test_events_feed_follows_every_execution_live(spear, http):
    headers = {"Accept": "text/event-stream"}
    async with http.get("/api/v1/events?kinds=requested,completed,failed", headers=headers) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        first = await _post(http, "/api/v1/invoke", invoke_body("echo", value=1))
        second = await _post(http, "/api/v1/invoke", invoke_body("fail", message="x"))
        frames = await asyncio.wait_for(sse_frames(response, 4), 10)
    assert [(f["event"], json.loads(f["data"])["execution_id"]) for f in frames] == [
        ("requested", first[1]["execution_id"]),
        ("completed", first[1]["execution_id"]),
        ("requested", second[1]["execution_id"]),
        ("failed", second[1]["execution_id"]),
    ]
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(ids)
    resume = {**headers, "Last-Event-ID": frames[1]["id"]}  # reconnecting resumes after the last event seen
    async with http.get("/api/v1/events?kinds=requested,failed", headers=resume) as response:
        frames = await asyncio.wait_for(sse_frames(response, 2), 10)
    assert [f["event"] for f in frames] == ["requested", "failed"]
    for bad in ("kinds=requested,exploded", "task_id=a.b"):
        status, body, _ = await _get(http, f"/api/v1/events?{bad}", headers=headers)
        assert status == 400 and body["error_code"] == "INVALID_ARGUMENT", bad


async def test_the_web_view_is_served_with_its_assets_and_kept_to_its_origin(http):
    async with http.get("/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assets = re.findall(r'(?:href|src)="(/[^"]*)"', page)
    assert set(assets) == {"/web/app.css", "/web/app.js", "/web/favicon.svg"}
    for path, media in (("/web/app.css", "text/css"), ("/web/app.js", "text/javascript")):
        async with http.get(path) as response:
            assert response.status == 200 and response.content_type == media, path
            text = await response.text()
        assert not re.search(r"https?://", text), f"{path} names an external URL"
    status, body, _ = await _get(http, "/web/nothing.js")
    assert status == 404 and body["error_code"] == "NOT_FOUND"


async def test_sse_reconnecting_after_the_end_closes_at_once_and_huge_ids_are_400(spear, http, caplog):
    _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("echo", value=1))
    path = f"/api/v1/executions/{body['execution_id']}/events"
    headers = {"Accept": "text/event-stream"}
    async with http.get(path, headers=headers) as response:
        frames = await asyncio.wait_for(sse_frames(response), 10)
    assert frames[-1]["event"] == "completed"
    for last_id in (frames[-1]["id"], str(int(frames[-1]["id"]) + 50)):  # what a browser sends on reconnect
        async with http.get(path, headers={**headers, "Last-Event-ID": last_id}) as response:
            assert response.status == 200
            assert await asyncio.wait_for(sse_frames(response), 5) == []  # closed at once, no keep-alives
    for last_id in ("9" * 5000, "１２", "-1"):
        status, error, _ = await _get(http, path, headers={**headers, "Last-Event-ID": last_id})
        assert status == 400 and error["error_code"] == "INVALID_ARGUMENT"
    assert "ValueError" not in caplog.text


async def test_a_forged_terminal_publish_does_not_end_a_live_sse_stream(spear, http, client):
    _, body, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=800))
    execution_id = body["execution_id"]
    names = spear.names
    forged = {"type": "completed", "execution_id": execution_id, "task_id": "demo", "function_name": "sleep"}
    forged |= {"at": "x", "attempt": 1, "result": {"status": ExecutionStatus.COMPLETED, "result": "forged"}}
    headers = {"Accept": "text/event-stream"}
    async with http.get(f"/api/v1/executions/{execution_id}/events", headers=headers) as response:
        reading = asyncio.ensure_future(sse_frames(response))
        await asyncio.sleep(0.2)
        imitated = {"Nats-Stream": names.stream, "Nats-Sequence": "99999999"}
        await client.publish(
            names.event("demo", execution_id, "completed"), json.dumps(forged).encode(), headers=imitated
        )
        await client.publish(names.event("demo", execution_id, "failed"), b"garbage", headers=imitated)
        frames = await asyncio.wait_for(reading, 10)
    assert [f["event"] for f in frames] == ["requested", "started", "completed"]
    assert json.loads(frames[-1]["data"])["result"]["result"] == 800


@pytest.mark.parametrize(
    "body", [b'{"task_id": "demo", "function_name": "echo", "x": "\xff"}', b"[" * 990 + b"]" * 990]
)
async def test_poison_bodies_are_400_never_500(http, body):
    for path in ("/api/v1/invoke", "/api/v1/executions/some-id/cancel"):
        status, error, _ = await _post(http, path, body)
        assert status == 400 and error["error_code"] == "INVALID_ARGUMENT", (path, error)


async def test_list_filters_refuse_ids_with_a_trailing_newline(http):
    status, error, _ = await _get(http, "/api/v1/executions?task_id=demo%0A")
    assert status == 400 and error["error_code"] == "INVALID_ARGUMENT"


async def test_open_event_streams_do_not_hold_up_a_server_stop(spear):
    """A browser left open on the live views must not keep `spear up` from stopping (aiohttp
    would wait up to a minute for their handlers)."""
    port = free_port()
    runner = await components.start_http(AsyncExitStack(), spear.service, port, host="127.0.0.1")
    _, body, _ = await _post_once(port, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=30000))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        headers = {"Accept": "text/event-stream"}
        feed = await http.get("/api/v1/events", headers=headers)
        one = await http.get(f"/api/v1/executions/{body['execution_id']}/events", headers=headers)
        assert feed.status == one.status == 200
        await asyncio.wait_for(runner.cleanup(), 10)
        for response in (feed, one):  # both streams were ended by the server
            await asyncio.wait_for(response.content.read(), 5)
            response.release()
    await spear.service.cancel(contract.CancelExecutionRequest(execution_id=body["execution_id"], force=True))


async def _post_once(port, path, body):
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        return await _post(http, path, body)


async def test_clients_that_go_away_are_not_errors(spear, http, caplog):
    """Ordinary disconnects (a SYNC caller gives up, an SSE reader closes) are debug-level one-liners."""
    _, running, _ = await _post(http, "/api/v1/invoke", invoke_body("sleep", "ASYNC", ms=1500))
    for path, kwargs in (
        ("/api/v1/invoke", {"method": "POST", "json": invoke_body("sleep", ms=600)}),
        (f"/api/v1/executions/{running['execution_id']}/events", {"headers": {"Accept": "text/event-stream"}}),
    ):
        method = kwargs.pop("method", "GET")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async with http.request(method, path, **kwargs) as response:
                    await response.read()
    await asyncio.sleep(1.5)  # the server side notices and ends its handlers
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("spear.api", "aiohttp"))]
    assert not [r for r in noisy if r.exc_info], [r.getMessage() for r in noisy]
    assert not [r for r in noisy if r.levelno >= logging.ERROR], [r.getMessage() for r in noisy]
    # counted as CLIENT_CLOSED, not as the 499 nobody read (probe67: the code is never a bare number)
    codes = {s.labels["code"] for f in await _metrics(http) for s in f.samples if s.name == "spear_requests_total"}
    assert "CLIENT_CLOSED" in codes and not [code for code in codes if code.isdigit()], codes


async def test_connections_reset_mid_request_are_not_errors(spear, http, caplog):
    port = http._base_url.port
    body = json.dumps(invoke_body("sleep", ms=300)).encode()
    request = (
        f"POST /api/v1/invoke HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for payload in (request + body, request + body[:5], b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n"):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        writer.close()
    await asyncio.sleep(1.0)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("spear.api", "aiohttp"))]
    assert not noisy, [r.getMessage() for r in noisy]


async def _api_with(stack: AsyncExitStack, running, **api: object) -> int:
    """An HTTP API of its own on `running`'s connection, with these `[api]` settings: its port."""
    service = Service(running.nc, with_overrides(running.settings, api=api))
    await service.start()
    stack.push_async_callback(service.stop)
    port = free_port()
    await components.start_http(stack, service, port, host="127.0.0.1")
    return port


async def _events_through_a_small_window(
    port: int, execution_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An SSE request for an execution's events on a socket with a small receive window (set
    before connecting), so that what the client leaves unread soon holds the server up."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    writer.write(f"GET /api/v1/executions/{execution_id}/events HTTP/1.1\r\nHost: localhost\r\n".encode())
    writer.write(b"Accept: text/event-stream\r\n\r\n")
    return reader, writer


@pytest_asyncio.fixture
async def tight_http(spear):
    """The HTTP API with small connection bounds: 3 connections, 300 ms to send headers (and a body)."""
    async with AsyncExitStack() as stack:
        yield await _api_with(stack, spear, header_timeout_ms=300, body_timeout_ms=300, max_connections=3)


async def test_an_sse_client_that_never_reads_is_disconnected_after_write_timeout_ms(spear, client):
    """probe32: an SSE client that takes nothing held its connection, the follower and a page of
    history for ever. Once the server has waited `write_timeout_ms` with nothing taken, the
    connection is closed; a client reading slowly is not (it takes some within each period)."""
    word = "w" * 20_000  # ~8 MB of chunks: past what the sockets between can buffer
    body = {**invoke_body("generate_text", "ASYNC", prompt=word, tokens=400), "execution_id": "never-read"}
    reply, _ = await spear.call(client, "invoke_function", body)
    assert reply["success"], reply
    ended = has_status(ExecutionStatus.COMPLETED, ExecutionStatus.FAILED)
    await spear.status_until(client, "never-read", ended, timeout=30)

    async def read_all(reader: asyncio.StreamReader, pace_s: float) -> bytes:
        taken = bytearray()
        while b"event: failed" not in taken[-30_000:] and b"event: completed" not in taken[-30_000:]:
            part = await asyncio.wait_for(reader.read(1 << 16), 10)
            if not part:
                break  # closed by the server
            taken += part
            await asyncio.sleep(pace_s)
        return bytes(taken)

    async with AsyncExitStack() as stack:
        port = await _api_with(stack, spear, write_timeout_ms=1000)
        reader, writer = await _events_through_a_small_window(port, "never-read")
        await asyncio.sleep(3)  # nothing read: the server waits (swept once a second), then gives up on it
        taken = await read_all(reader, 0)
        writer.close()
        assert taken.startswith(b"HTTP/1.1 200"), taken[:200]
        assert b"event: failed" not in taken and b"event: completed" not in taken  # cut short
        assert reader.at_eof()
        # A reader slower than the server (64 KB every 30 ms: paused at every look of the sweep,
        # taking some between) gets the whole stream
        reader, writer = await _events_through_a_small_window(port, "never-read")
        taken = await read_all(reader, 0.03)
        writer.close()
        assert taken.count(b"event: chunk") == 400, (taken.count(b"event: chunk"), taken[-600:])


async def test_slow_clients_cannot_hold_connections(tight_http):
    """Slowloris: connections that drip their headers are closed after header_timeout_ms, and
    beyond max_connections a client gets 503 with Retry-After at once."""
    port = tight_http
    slow = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        slow.append((reader, writer))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    refused = await asyncio.wait_for(reader.read(), 5)
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused
    for reader, writer in slow:  # each is closed by the server, although it keeps dripping
        with contextlib.suppress(ConnectionResetError):  # closed (FIN) or aborted (RST): both end it
            writer.write(b"X-Drip: 1\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session,  # room again
        session.get("/api/v1/health") as response,
    ):
        assert response.status == 200


async def test_a_kept_alive_connection_gets_a_header_deadline_per_request(tight_http):
    reader, writer = await asyncio.open_connection("127.0.0.1", tight_http)
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"GET /api/v1/health HTTP/1.1\r\n")  # the next request, never finished
    remaining = await asyncio.wait_for(reader.read(), 5)  # the first body, then closed
    assert b"HTTP/1.1" not in remaining
    writer.close()


@pytest.mark.parametrize(
    "raw, said",
    [
        (
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n",
            "Content-Type",
        ),
        (b"GARBAGE\r\n\r\n", "method"),
    ],
)
async def test_a_malformed_request_is_400_and_one_debug_line(http, caplog, raw, said):
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection(http._base_url.host, http._base_url.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 10)  # aiohttp answers, then closes
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), answer
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head.lower(), head  # the contract's body, not aiohttp's page
    reply = json.loads(body)
    assert reply["success"] is False and reply["error_code"] == "INVALID_ARGUMENT", reply
    assert reply["message"].startswith("malformed HTTP request: ") and said in reply["message"], reply
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1, records
    assert records[0].levelno == logging.DEBUG and records[0].exc_info is None
    assert said in records[0].getMessage() and "\n" not in records[0].getMessage()


async def test_a_malformed_request_logs_nothing_at_the_default_level(http, caplog):
    """aiohttp logs some (a header too long) at ERROR: made a DEBUG line, such a record is dropped
    where DEBUG is off (it was printed, labelled DEBUG, at INFO). The handler takes every level,
    as `spear up`'s does: the logger's level decides."""
    caplog.set_level(logging.INFO)
    caplog.handler.setLevel(logging.NOTSET)
    raw = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection(http._base_url.host, http._base_url.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error_code"] == "INVALID_ARGUMENT"
    assert [r for r in caplog.records if r.name == "aiohttp.server"] == []


async def test_a_dripped_body_is_refused_when_its_deadline_passes(tight_http):
    """Slow bodies too: headers in time, then a body a byte at a time, is 400 after body_timeout_ms."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tight_http)
    writer.write(
        b"POST /api/v1/invoke HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    began = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert time.monotonic() - began < 3
    body = await asyncio.wait_for(reader.read(400), 5)
    assert b"INVALID_ARGUMENT" in body and b"did not arrive" in body, body
    writer.close()


async def test_a_stopping_http_api_waits_for_requests_in_flight_a_few_seconds_not_a_minute(spear, client):
    # A SYNC call of a 60 s function holds its request; aiohttp's own default would wait for it
    # a minute (a soak saw a stop take 69 s behind a statistics scan).
    port = free_port()
    stack = AsyncExitStack()
    await components.start_http(stack, spear.service, port, host="127.0.0.1")
    spear.service.stop_grace_s = 1.0  # (SYNC callers are answered then; a worker's grace is 10 s)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        body = {**invoke_body("sleep", ms=60_000), "execution_id": "held-by-a-stop"}
        held = asyncio.create_task(session.post("/api/v1/invoke", json=body))
        await spear.status_until(client, "held-by-a-stop", has_status(ExecutionStatus.RUNNING))
        began = asyncio.get_running_loop().time()
        await stack.aclose()
        assert asyncio.get_running_loop().time() - began < 1.0 + 3
        held.cancel()
        with contextlib.suppress(BaseException):
            await held
    await spear.call(client, "cancel_execution", {"execution_id": "held-by-a-stop", "force": True})


@pytest.mark.parametrize("status", ["²", "¹", "٤", "99999999999999999999999", "04"])
async def test_a_status_that_only_looks_like_a_number_is_400_never_500(http, status):
    """str.isdigit() is true of '²' and of other scripts' digits: int('²') raised, a 500; a number
    beyond int64 made the NATS request one msgspec cannot read."""
    path = f"/api/v1/executions?status={urllib.parse.quote(status)}"
    async with http.get(path) as response:
        body = await response.json()
        if status == "04":  # (a leading zero: the number 4 still)
            assert response.status == 200, body
        else:
            assert response.status == 400 and body["error_code"] == "INVALID_ARGUMENT", (status, response.status, body)


async def test_a_browser_page_of_another_origin_cannot_invoke_or_cancel(spear, http, client):
    """probe34: with no tokens (the default, on loopback), a page on another local port invoked
    and cancelled functions: `fetch(..., {mode: "no-cors"})` and `sendBeacon` need no preflight.
    What a browser says of such a request (`Origin`, `Sec-Fetch-Site`) now gets it refused;
    clients that are not browsers send neither, and the web view's own requests are same-origin."""
    reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=30_000))
    execution_id = reply["execution_id"]
    own = f"http://{http._base_url.host}:{http._base_url.port}"
    body = {**invoke_body("echo", value="from a foreign page"), "execution_id": "csrf-1"}
    for headers in (
        {"Origin": "http://127.0.0.1:33999"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # (another port of this host: same site, not same origin)
    ):
        # as no-cors sends it: no Content-Type
        status, refused, _ = await _post(http, "/api/v1/invoke", json.dumps(body), headers=headers)
        assert status == 403 and refused["error_code"] == "PERMISSION_DENIED", (headers, refused)
        status, refused, _ = await _post(http, f"/api/v1/executions/{execution_id}/cancel", b"", headers=headers)
        assert status == 403 and refused["error_code"] == "PERMISSION_DENIED", (headers, refused)
    found, _ = await spear.call(client, "get_execution_status", {"execution_id": "csrf-1"})
    assert found["found"] is False
    status_reply, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
    assert status_reply["result"]["status"] != ExecutionStatus.CANCELLED
    # the page's own origin, and a client that is no browser, are served
    same = {"Origin": own, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
    status, answered, _ = await _post(http, "/api/v1/invoke", body, headers=same)
    assert status == 200 and answered["result"]["result"] == "from a foreign page", answered
    status, cancelled, _ = await _post(http, f"/api/v1/executions/{execution_id}/cancel", b"", headers={})
    assert status == 200 and cancelled["success"], cancelled


async def test_without_tokens_a_host_that_does_not_name_this_machine_is_refused(spear):
    """probe34: a page whose own name was made to resolve to 127.0.0.1 (DNS rebinding) reaches a
    tokenless loopback spear as a same-origin page; its requests name that name in `Host`. Only
    this machine's names, and `[api] allowed_hosts`, are served then."""
    async with AsyncExitStack() as stack:
        port = await _api_with(stack, spear, allowed_hosts=["Spear.Internal"])
        async with aiohttp.ClientSession() as session:
            for host, expected in (
                ("evil.example", 403),
                (f"evil.example:{port}", 403),
                ("localhost", 200),
                (f"127.0.0.1:{port}", 200),
                ("[::1]", 200),
                ("app.localhost", 200),
                ("spear.internal", 200),
            ):
                async with session.get(
                    f"http://127.0.0.1:{port}/api/v1/executions", headers={"Host": host}
                ) as response:
                    assert response.status == expected, (host, response.status, await response.text())
                    if expected == 403:
                        assert (await response.json())["error_code"] == "PERMISSION_DENIED"
            # behind a proxy that sends its own name in Host (nginx's default), the web view's page
            # is the public name: forwarded, or listed in allowed_hosts (review31: refused)
            body = invoke_body("echo", value=1)
            for headers, expected in (
                ({"Origin": "https://spear.internal"}, 200),
                ({"Origin": "https://public.example", "X-Forwarded-Host": "public.example"}, 200),
                ({"Origin": "https://public.example"}, 403),
            ):
                async with session.post(
                    f"http://127.0.0.1:{port}/api/v1/invoke", json=body, headers=headers
                ) as response:
                    assert response.status == expected, (headers, await response.text())


async def test_a_steady_reader_of_one_large_stream_item_is_not_cut(served, client):
    """review31: the write sweep took "the same drain wait seen again" for "the client took
    nothing", but one large write (an SSE item of megabytes) keeps aiohttp on one wait until nearly
    all of it has left: a client taking 640 KB/s without a pause was cut after write_timeout_ms.
    Fewer bytes unsent since the last look count as taken too."""
    from tests.conftest import call_body

    body = {**call_body("big_chunk", "STREAM", megabytes=6), "execution_id": "big-item"}  # past the kernel buffers
    reply, _ = await served.call(client, "invoke_function", body, timeout=30)
    assert reply["success"], str(reply)[:300]
    ended = has_status(ExecutionStatus.COMPLETED, ExecutionStatus.FAILED)
    state, _ = await served.status_until(client, "big-item", ended, timeout=60)
    assert state["result"]["status"] == ExecutionStatus.COMPLETED, str(state)[:400]

    async with AsyncExitStack() as stack:
        # each item takes this reader seconds to take, past write_timeout_ms and the sweep's period
        port = await _api_with(stack, served, write_timeout_ms=1000)
        reader, writer = await _events_through_a_small_window(port, "big-item")
        taken, began = bytearray(), time.monotonic()
        while b"event: completed" not in taken[-2000:]:
            part = await asyncio.wait_for(reader.read(65_536), 10)  # never a pause of more than 0.02 s
            if not part:
                break
            taken += part
            await asyncio.sleep(0.02)
        writer.close()
        assert b"event: completed" in taken, f"cut after {time.monotonic() - began:.1f} s at {len(taken)} bytes"


async def _posts(spear, cases, allowed_hosts):
    """POST /api/v1/invoke with each case's headers to a tokenless loopback API; the statuses."""
    got = []
    async with AsyncExitStack() as stack:
        port = await _api_with(stack, spear, allowed_hosts=allowed_hosts)
        async with aiohttp.ClientSession() as session:
            for headers in cases:
                async with session.post(
                    f"http://127.0.0.1:{port}/api/v1/invoke", json=invoke_body("echo", value=1), headers=headers
                ) as response:
                    got.append(response.status)
    return got


async def test_the_web_views_posts_pass_behind_proxies_that_forward_the_host(spear):
    """review32: the Origin's host:port was compared with X-Forwarded-Host whole: two proxies
    (Apache's mod_proxy appends: "public.example, inner.proxy") or nginx's usual
    `proxy_set_header X-Forwarded-Host $host` (no port) on a public port other than 443 refuse
    the web view's own POSTs (Sec-Fetch-Site: same-origin) with PERMISSION_DENIED."""
    page = {"Sec-Fetch-Site": "same-origin"}
    cases = [
        {**page, "Origin": "https://public.example", "X-Forwarded-Host": "public.example, inner.proxy"},
        {**page, "Origin": "https://public.example:8443", "X-Forwarded-Host": "public.example"},
    ]
    assert await _posts(spear, cases, []) == [200, 200]


async def test_a_page_on_another_port_of_an_allowed_host_is_another_origin(spear):
    """review32: `[api] allowed_hosts` matched the Origin's host name alone, any port:
    a page served by another app on spear.corp:9999 (a browser that sends no Sec-Fetch-Site, as
    Safari before 16.4) may invoke on spear.corp:8080."""
    cases = [{"Origin": "http://spear.corp:9999", "Host": "spear.corp:8080"}]
    assert await _posts(spear, cases, ["spear.corp"]) == [403]
