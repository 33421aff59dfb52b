"""The NATS gateway end to end: real server, real worker and projection, requests over NATS."""

import asyncio
import json
from contextlib import AsyncExitStack

import msgspec
import pytest

from spear import __version__ as spear_version
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import ExecutionStatus
from spear.core.names import API_OPERATIONS, Names
from spear.core.versions import semantic
from spear.demo import demo
from spear.jetstream.connection import connect
from tests.conftest import has_status, invoke_body, start_spear, until_registered
from tests.processes import count_responders


async def test_sync_call_replies_with_the_terminal_result(spear, client):
    reply, headers = await spear.call(client, "invoke_function", invoke_body("calculate_fibonacci", n=30))
    assert reply["success"] is True and reply["error_code"] == ""
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED
    assert reply["result"]["result"] == 832040
    assert reply["result"]["attempt"] == 1
    assert reply["result"]["started_at"].endswith("Z") and reply["result"]["completed_at"].endswith("Z")
    assert "Nats-Service-Error-Code" not in headers


async def test_function_errors_are_a_successful_call_with_a_failed_result(spear, client):
    reply, _ = await spear.call(client, "invoke_function", invoke_body("fail", message="boom"))
    assert reply["success"] is True
    assert reply["result"]["status"] == ExecutionStatus.FAILED
    assert reply["result"]["error_code"] == "FUNCTION_ERROR"
    assert reply["result"]["error_message"] == "RuntimeError: boom"
    reply, _ = await spear.call(client, "invoke_function", invoke_body("calculate_fibonacci", n="three"))
    assert reply["result"]["status"] == ExecutionStatus.FAILED  # the function's own InvalidArgument
    assert reply["result"]["error_code"] == "INVALID_ARGUMENT"


async def test_quick_calculation_takes_numbers_and_numeric_strings_not_python_syntax(spear, client):
    """CONTRACT §7: `input` is a number or numeric string (probe50: `1_000` was Python's 1000)."""
    for given, doubled in ((21, 42), ("21", 42), ("-2.5", -5.0), ("1e3", 2000.0)):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("quick_calculation", input=given))
        assert reply["result"]["result"] == doubled, (given, reply)
    for given in ("1_000", "١٢", " 12", "12\n", "+1", "ten", True, None):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("quick_calculation", input=given))
        assert reply["result"]["error_code"] == "INVALID_ARGUMENT", (given, reply)


async def test_async_call_is_found_at_once_and_completes(spear, client):
    body = invoke_body("sleep", mode="ASYNC", ms=300)
    reply, _ = await spear.call(client, "invoke_function", body)
    execution_id = reply["execution_id"]
    assert reply["success"] is True
    assert reply["result"]["status"] == ExecutionStatus.PENDING
    assert reply["status_endpoint"] == f"/api/v1/execution/{execution_id}/status"
    status, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
    assert status["found"] is True
    assert status["result"]["status"] in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)
    assert status["execution"]["function_name"] == "sleep"
    for _ in range(100):
        status, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
        if status["result"]["status"] == ExecutionStatus.COMPLETED:
            break
        await asyncio.sleep(0.05)
    assert status["result"]["status"] == ExecutionStatus.COMPLETED and status["result"]["result"] == 300
    without, _ = await spear.call(
        client, "get_execution_status", {"execution_id": execution_id, "include_result": False}
    )
    assert without["found"] is True and without["result"]["result"] is None  # the data left out,
    assert without["result"]["status"] == ExecutionStatus.COMPLETED  # the status where SPEAR has it


async def test_every_async_reply_is_immediately_visible_to_status(spear, client):
    for _ in range(30):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=1))
        status, _ = await spear.call(client, "get_execution_status", {"execution_id": reply["execution_id"]})
        assert status["found"] is True, status


async def test_estimate_comes_from_recent_execution_times(spear, client):
    for _ in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", ms=150))
        assert reply["result"]["status"] == ExecutionStatus.COMPLETED
    await asyncio.sleep(1.2)  # the gateway caches estimates for a second
    reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=150))
    assert 150 <= reply["estimated_completion_ms"] < 1000
    quick, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=0))
    assert quick["estimated_completion_ms"] < reply["estimated_completion_ms"]


async def test_plain_subscription_sees_each_completion_with_its_result(spear, client):
    seen = []

    async def collect(msg):
        seen.append((msg.subject, json.loads(msg.data)))

    await client.subscribe(f"{spear.names.prefix}.exec.*.*.completed", cb=collect)
    await client.flush()
    ids = []
    for n in (10, 20):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("calculate_fibonacci", mode="ASYNC", n=n))
        ids.append(reply["execution_id"])
    # A last SYNC call: completions come in stream order, so a duplicate of the first two (which
    # must not exist) would have come before the last one's.
    last, _ = await spear.call(client, "invoke_function", invoke_body("calculate_fibonacci", n=1))
    for _ in range(250):
        if seen and seen[-1][1]["execution_id"] == last["execution_id"]:
            break
        await asyncio.sleep(0.02)
    assert seen[-1][1]["execution_id"] == last["execution_id"]
    seen.pop()
    assert sorted(event["execution_id"] for _, event in seen) == sorted(ids)
    for subject, event in seen:
        assert subject == f"{spear.names.prefix}.exec.demo.{event['execution_id']}.completed"
        assert event["type"] == "completed"
        assert event["result"]["status"] == ExecutionStatus.COMPLETED
        assert event["result"]["result"] in (55, 6765)


def _nested(levels: int) -> bytes:
    """An echo request whose parameter value is a list nested `levels` deep (the request adds 3)."""
    value = b"[" * (levels - 3) + b"]" * (levels - 3)
    return b'{"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": ' + value + b"}]}"


BAD_REQUESTS = [
    (b"not json", "INVALID_ARGUMENT", "400"),
    (b"[]", "INVALID_ARGUMENT", "400"),
    (b"42", "INVALID_ARGUMENT", "400"),
    (b"", "INVALID_ARGUMENT", "400"),
    (b'{"function_name": "echo"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "de.mo", "function_name": "echo"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "ec*o"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": ">", "function_name": "echo"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "echo", "execution_id": "a b"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "echo", "execution_id": ""}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": 5, "function_name": "echo"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "echo", "parameters": "x"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "echo", "parameters": [{"value": 1}]}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "echo", "context": {"timeout_ms": -1}}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "demo", "function_name": "echo", "execution_mode": "LATER"}', "INVALID_ARGUMENT", "400"),
    # poison at the door: nested too deep (987 levels once looped forever in the worker), not UTF-8
    (_nested(987), "INVALID_ARGUMENT", "400"),
    (_nested(65), "INVALID_ARGUMENT", "400"),
    (_nested(5000), "INVALID_ARGUMENT", "400"),
    (
        b'{"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": "\xff"}]}',
        "INVALID_ARGUMENT",
        "400",
    ),
    (
        b'{"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": "\xed\xa0\x80"}]}',
        "INVALID_ARGUMENT",
        "400",
    ),
    (b'{"task_id": "demo\\n", "function_name": "echo"}', "INVALID_ARGUMENT", "400"),
    (b'{"task_id": "nope", "function_name": "echo"}', "NOT_FOUND", "404"),
    (b'{"task_id": "demo", "function_name": "nope"}', "NOT_FOUND", "404"),
    (
        b'{"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": "'
        + b"x" * 1_100_000
        + b'"}]}',
        "PAYLOAD_TOO_LARGE",
        "413",
    ),
]


@pytest.mark.parametrize("body, code, http", BAD_REQUESTS)
async def test_bad_requests_get_their_code_and_headers_and_write_nothing(spear, client, body, code, http):
    before = await _stream_messages(client, spear)
    reply, headers = await spear.call(client, "invoke_function", body)
    assert reply == {"success": False, "error_code": code, "message": reply["message"]}
    assert reply["message"]
    assert headers["Nats-Service-Error-Code"] == http
    assert headers["Nats-Service-Error"]
    assert await _stream_messages(client, spear) == before
    ok, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="still serving"))
    assert ok["result"]["result"] == "still serving"


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"execution_id": "a.b"}', b'{"execution_id": 3}', b"{}"])
async def test_bad_status_requests_are_invalid_argument(spear, client, body):
    reply, headers = await spear.call(client, "get_execution_status", body)
    assert reply["success"] is False and reply["error_code"] == "INVALID_ARGUMENT"
    assert headers["Nats-Service-Error-Code"] == "400"


async def test_unknown_execution_is_not_found(spear, client):
    reply, headers = await spear.call(client, "get_execution_status", {"execution_id": "never-was"})
    assert reply["found"] is False and "never-was" in reply["message"] and reply["error_code"] == "NOT_FOUND"
    assert headers["Nats-Service-Error-Code"] == "404"


async def test_list_workers_names_each_worker_of_this_deployment_and_its_tasks(spear, client):
    reply, headers = await spear.call(client, "list_workers", {})
    assert reply == {
        "workers": [
            {
                "worker_id": spear.worker.worker_id,
                "tasks": ["demo"],
                "version": reply["workers"][0]["version"],
                "instance_id": spear.worker.service.info().id,
                "running_executions": [],
            }
        ]
    }
    assert (await spear.call(client, "list_workers", b""))[0] == reply  # an empty request is fine
    reply, headers = await spear.call(client, "list_workers", {"task_id": "a.b"})
    assert reply["error_code"] == "INVALID_ARGUMENT" and headers["Nats-Service-Error-Code"] == "400"


async def test_list_workers_shows_what_each_worker_runs_as_the_worker_says(spear, client):
    # No projection writes states here: the running executions come from the workers themselves
    # (the listing once scanned every execution state for them, on every poll of the web view).
    await spear.projection.stop()
    accepted, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=5000))
    execution_id = accepted["execution_id"]

    async def running_executions() -> list[str]:
        reply, _ = await spear.call(client, "list_workers", {})
        (worker,) = reply["workers"]
        return worker["running_executions"]

    deadline = asyncio.get_running_loop().time() + 10
    while await running_executions() != [execution_id]:
        assert asyncio.get_running_loop().time() < deadline, "the worker never listed what it runs"
        await asyncio.sleep(0.05)
    cancelled, _ = await spear.call(client, "cancel_execution", {"execution_id": execution_id, "force": True})
    assert cancelled["success"] is True
    while await running_executions():
        assert asyncio.get_running_loop().time() < deadline + 10, "an ended execution stayed listed"
        await asyncio.sleep(0.05)


async def test_task_counts_are_counted_from_the_stream_not_from_every_state(spear, client):
    # With no projection, no state is written: the counts come from the stream's `requested`
    # events (the server counts them), the newest one's status from its events.
    await spear.projection.stop()
    for value in range(3):
        await spear.call(
            client, "invoke_function", {**invoke_body("sleep", "ASYNC", ms=5000), "execution_id": f"s{value}"}
        )
    finished, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=1))
    assert finished["result"]["status"] == ExecutionStatus.COMPLETED
    reply, _ = await spear.call(client, "get_task", {"task_id": "demo"})
    assert (reply["task"]["execution_count"], reply["task"]["last_status"]) == (4, ExecutionStatus.COMPLETED)
    listed, _ = await spear.call(client, "list_tasks", {"include_details": True})
    (demo,) = listed["tasks"]
    assert (demo["execution_count"], demo["last_status"]) == (4, ExecutionStatus.COMPLETED)
    # and who serves it, as get_task says (probe54: the list said nobody)
    assert demo["workers"] == reply["task"]["workers"] == [spear.worker.worker_id], (demo, reply)
    plain, _ = await spear.call(client, "list_tasks", {})
    assert plain["tasks"][0]["workers"] == []  # details only when asked for (a read of every worker)
    for value in range(3):
        await spear.call(client, "cancel_execution", {"execution_id": f"s{value}", "force": True})


async def test_client_execution_id_is_an_idempotency_key(spear, client):
    body = {**invoke_body("calculate_fibonacci", n=12), "execution_id": "my-key-1"}
    first, _ = await spear.call(client, "invoke_function", body)
    again, _ = await spear.call(client, "invoke_function", body)
    assert first["execution_id"] == again["execution_id"] == "my-key-1"
    assert again["result"]["result"] == first["result"]["result"] == 144
    assert again["result"]["completed_at"] == first["result"]["completed_at"]  # not run again
    different = {**invoke_body("calculate_fibonacci", n=13), "execution_id": "my-key-1"}
    reply, headers = await spear.call(client, "invoke_function", different)
    assert reply["error_code"] == "ALREADY_EXISTS" and headers["Nats-Service-Error-Code"] == "409"
    events = await spear.service.store.history("my-key-1")
    assert [event.kind for event, _ in events] == ["requested", "started", "completed"]


async def test_gateway_is_a_discoverable_micro_service(spear, client):
    reply = await client.request(f"$SRV.INFO.{spear.names.service_name}", b"", timeout=2)
    info = json.loads(reply.data)
    assert info["name"] == spear.names.prefix and info["version"] == semantic(spear_version)
    endpoints = {endpoint["name"]: endpoint["subject"] for endpoint in info["endpoints"]}
    assert endpoints["invoke_function"] == f"{spear.names.prefix}.api.invoke_function"
    # every endpoint is an operation of the contract, at its subject
    assert set(endpoints) <= set(API_OPERATIONS)
    assert all(subject == spear.names.api(name) for name, subject in endpoints.items())
    assert all(endpoint["queue_group"] == spear.names.service_name for endpoint in info["endpoints"])
    with pytest.raises(ValueError):
        spear.names.api("invoke_functoin")


async def test_two_deployments_on_one_nats_count_only_their_own_components(settings, client):
    """Micro service names carry the prefix, so one deployment's workers and projections never
    make another look healthy. The default prefix keeps the contract's name, `spear`."""
    prefix = settings.subject_prefix
    async with AsyncExitStack() as stack:
        default = await start_spear(stack, with_overrides(settings, subject_prefix="spear"))
        other = await start_spear(stack, settings, with_worker=False)  # a gateway and a projection only
        assert _service_names(default.names) == ["spear", "spear-worker", "spear-projection"]
        assert _service_names(other.names) == [prefix, f"{prefix}-worker", f"{prefix}-projection"]
        assert [await count_responders(client, name) for name in _service_names(default.names)] == [1, 1, 1]
        assert [await count_responders(client, name) for name in _service_names(other.names)] == [1, 0, 1]
        health, _ = await default.call(client, "get_health", {})
        assert health["status"] == "healthy", health
        health, _ = await other.call(client, "get_health", {})
        assert health["status"] == "degraded" and health["components"]["worker"] is False, health
        await other.projection.stop()
        health, _ = await other.call(client, "get_health", {})
        assert health["components"]["projection"] is False, health  # the default's does not count
        health, _ = await default.call(client, "get_health", {})
        assert health["status"] == "healthy", health


async def test_health_of_an_http_api_with_no_nats_gateway_says_no_gateway_answers(settings):
    """probe36: a `spear api` of its own said only "serving" while no gateway answered NATS
    clients (every NATS call UNAVAILABLE). It says so now, and lists the gateway in its
    components; the status stays healthy, as a deployment may serve HTTP alone (review43)."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_gateway=False)
        await until_registered(running, "demo")
        health = await running.service.health()
        assert health.status == "healthy" and health.components["gateway"] is False, health
        assert health.message == "serving; no NATS gateway answers (NATS clients cannot call; HTTP serves)", health
        await components.start_gateway(stack, running.service)
        health = await running.service.health()
        assert (health.status, health.message, health.components["gateway"]) == ("healthy", "serving", True), health


def _service_names(names) -> list[str]:
    return [names.service_name, names.worker_service_name, names.projection_service_name]


async def _stream_messages(client, spear) -> int:
    info = await client.jetstream().stream_info(spear.names.stream)
    return info.state.messages


async def test_every_event_of_an_invocation_carries_its_trace(spear, client):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = f"00-{trace_id}-00f067aa0ba902b7-01"
    data = json.dumps(invoke_body("echo", value=1)).encode()
    reply = json.loads(
        (await client.request(spear.names.api("invoke_function"), data, 5, headers={"traceparent": incoming})).data
    )
    js = client.jetstream()
    parents = []
    for kind in ("requested", "started", "completed"):
        msg = await js.get_last_msg(spear.names.stream, spear.names.event("demo", reply["execution_id"], kind))
        parents.append(msg.headers["traceparent"])
    assert all(p.split("-")[1] == trace_id for p in parents)  # one trace
    assert len({p.split("-")[2] for p in parents} | {"00f067aa0ba902b7"}) == 4  # each its own span


async def test_requests_shaped_by_spears_proto_are_accepted(spear, client):
    body = {
        **invoke_body("calculate_fibonacci"),
        "parameters": [{"name": "n", "type": "int", "value": 10, "required": True, "description": "which"}],
        "context": {"execution_id": "proto-style", "timeout_ms": 5000, "max_retries": 0},
        "wait": True,
    }
    reply, _ = await spear.call(client, "invoke_function", body)
    assert reply["execution_id"] == "proto-style" and reply["result"]["result"] == 55


async def test_proto3_zero_values_are_not_set_and_enum_numbers_are_taken(spear, client):
    """A protojson client that writes every field sends each enum it never set as its zero value
    (`*_UNKNOWN`, or 0): each means the default; numbers name members as in SPEAR's proto."""
    unset = {**invoke_body("echo", value=1), "invocation_type": "INVOCATION_TYPE_UNKNOWN", "execution_mode": 0}
    reply, _ = await spear.call(client, "invoke_function", unset)
    assert reply["success"] and reply["result"]["result"] == 1, reply  # SYNC, an existing task
    numbered = {**invoke_body("echo", value=2), "invocation_type": 2, "execution_mode": 2}  # EXISTING_TASK, ASYNC
    reply, _ = await spear.call(client, "invoke_function", numbered)
    assert reply["success"] and reply["result"]["status"] == ExecutionStatus.PENDING, reply
    await spear.status_until(client, reply["execution_id"], has_status(ExecutionStatus.COMPLETED))
    await spear.caught_up()  # (a status filter reads the projection's states)
    every = [
        (await spear.call(client, "list_executions", {"status_filter": z}))[0] for z in (0, "EXECUTION_STATUS_UNKNOWN")
    ]
    assert all(len(page["executions"]) == 2 for page in every), every
    completed, _ = await spear.call(client, "list_executions", {"status_filter": 3})
    assert {e["status"] for e in completed["executions"]} == {ExecutionStatus.COMPLETED}, completed
    refused, _ = await spear.call(client, "invoke_function", {**invoke_body("echo", value=1), "execution_mode": 4})
    assert refused["error_code"] == "INVALID_ARGUMENT" and "execution_mode 4" in refused["message"], refused


async def test_a_sync_wait_that_ends_first_is_deadline_exceeded_and_the_execution_goes_on(settings, client):
    from contextlib import AsyncExitStack

    from spear.core.config import with_overrides
    from tests.conftest import start_spear

    tuned = with_overrides(settings, sync_execution={"wait_grace_ms": 300})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        for _ in range(100):
            if running.service.tasks.get("demo"):
                break
            await asyncio.sleep(0.02)
        await running.worker.stop()  # a backlog: nobody takes the invocation
        body = {**invoke_body("echo", value=1), "context": {"timeout_ms": 200}}
        reply, headers = await running.call(client, "invoke_function", body)
        assert reply["success"] is False and reply["error_code"] == "DEADLINE_EXCEEDED"
        assert headers["Nats-Service-Error-Code"] == "504"
        assert reply["status_endpoint"] == f"/api/v1/execution/{reply['execution_id']}/status"
        status, _ = await running.call(client, "get_execution_status", {"execution_id": reply["execution_id"]})
        assert status["found"] is True and status["result"]["status"] == ExecutionStatus.PENDING


async def test_a_sync_call_waits_for_the_backoffs_between_its_attempts_too(settings, client):
    """probe31: the gateway waited the attempts' time limits and its grace, not the backoffs the
    retries pause for: a call whose every attempt kept its limit was answered DEADLINE_EXCEEDED."""
    from contextlib import AsyncExitStack

    from spear.core.config import with_overrides
    from tests.conftest import start_spear, until_registered

    tuned = with_overrides(
        settings, sync_execution={"wait_grace_ms": 100}, retry={"initial_backoff_ms": 400, "jitter": 0.0}
    )
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        # two quick failures, then the result: ~1.2 s of backoff (0.4 + 0.8), over 3 × 0.3 + 0.1 s
        body = {**invoke_body("flaky", failures=2), "context": {"timeout_ms": 300, "max_retries": 2}}
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"] is True and reply["result"]["status"] == ExecutionStatus.COMPLETED, reply
        assert reply["result"]["result"] == 3


def test_the_longest_backoffs_are_the_top_of_each_ones_jitter_capped():
    from spear.core.state import backoff_ms, longest_backoffs_ms

    assert longest_backoffs_ms(0, 500, 2.0, 60_000, 0.2) == 0
    assert longest_backoffs_ms(3, 500, 2.0, 60_000, 0.2) == 4200  # (0.5 + 1 + 2) × 1.2
    assert longest_backoffs_ms(3, 500, 2.0, 1_000, 0.0) == 2500  # (0.5 + 1 + 1)
    drawn = sum(backoff_ms(attempt, 500, 2.0, 60_000, 0.2, 0.999999) for attempt in (1, 2, 3))
    assert drawn <= longest_backoffs_ms(3, 500, 2.0, 60_000, 0.2)
    # a steep multiplier and the most retries: capped, where the power itself overflows a float
    assert backoff_ms(100, 500, 1e4, 60_000, 0.0, 0.5) == 60_000
    assert longest_backoffs_ms(100, 500, 1e4, 60_000, 0.0) == 500 + 99 * 60_000


@pytest.mark.parametrize(
    ("initial", "multiplier", "top"),
    [(500, 2.0, 60_000), (500, 1.0, 60_000), (100, 1.5, 7_000), (1, 1.0001, 50), (70_000, 2.0, 60_000), (0, 2.0, 10)],
)
def test_the_longest_backoffs_worked_out_are_the_sum_of_each_ones(initial, multiplier, top):
    """review30: they are worked out, not summed retry by retry (10**9 retries took minutes); the
    same figure as the sum of each backoff at the top of its jitter."""
    import math

    from spear.core.state import _base_backoff_ms, longest_backoffs_ms

    for retries in (0, 1, 2, 3, 7, 40, 300):
        summed = sum(_base_backoff_ms(attempt, initial, multiplier, top) for attempt in range(1, retries + 1))
        assert abs(longest_backoffs_ms(retries, initial, multiplier, top, 0.2) - math.ceil(summed * 1.2)) <= 1


async def test_nesting_up_to_the_limit_is_served(spear, client):
    reply, _ = await spear.call(client, "invoke_function", _nested(64))
    assert reply["result"]["status"] == ExecutionStatus.COMPLETED
    assert reply["result"]["result"] == msgspec.json.decode(_nested(64))["parameters"][0]["value"]


@pytest.mark.parametrize("filter_", [{"task_id": "demo\n"}, {"start_after": "x\n"}])
async def test_list_filters_refuse_ids_with_a_trailing_newline(spear, client, filter_):
    reply, headers = await spear.call(client, "list_executions", filter_)
    assert reply["error_code"] == "INVALID_ARGUMENT" and headers["Nats-Service-Error-Code"] == "400"


async def test_get_execution_events_pages_the_stored_events_after_a_sequence(spear, client):
    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=7))
    execution_id = reply["execution_id"]
    page, _ = await spear.call(client, "get_execution_events", {"execution_id": execution_id})
    kinds = [e["event"]["type"] for e in page["events"]]
    assert page["found"] and not page["has_more"] and kinds == ["requested", "started", "completed"]
    seqs = [e["seq"] for e in page["events"]]
    assert seqs == sorted(seqs)
    first, _ = await spear.call(client, "get_execution_events", {"execution_id": execution_id, "limit": 1})
    assert first["events"] == page["events"][:1] and first["has_more"]
    rest, _ = await spear.call(client, "get_execution_events", {"execution_id": execution_id, "after_seq": seqs[0]})
    assert rest["events"] == page["events"][1:] and not rest["has_more"]
    after_end, _ = await spear.call(
        client, "get_execution_events", {"execution_id": execution_id, "after_seq": seqs[-1]}
    )
    assert after_end == {"found": True, "message": "", "error_code": "", "events": [], "has_more": False}
    missing, headers = await spear.call(client, "get_execution_events", {"execution_id": "nope"})
    assert not missing["found"] and missing["error_code"] == "NOT_FOUND" and headers["Nats-Service-Error-Code"] == "404"
    bad, _ = await spear.call(client, "get_execution_events", {"execution_id": execution_id, "limit": 100000})
    assert bad["error_code"] == "INVALID_ARGUMENT"


async def test_a_page_of_events_is_bounded_in_bytes_so_that_its_reply_fits_in_a_message(spear, client, monkeypatch):
    """Events near the size limit fit one per page: the page's reply still goes out (it did not:
    a chunk of 8 MB and the result listing it made a 16 MB reply, which nothing answered)."""
    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="x" * 3000))
    execution_id = reply["execution_id"]
    everything, _ = await spear.call(client, "get_execution_events", {"execution_id": execution_id})
    sizes = [len(json.dumps(e["event"])) for e in everything["events"]]  # requested and completed: ~3 KB each
    monkeypatch.setattr(type(spear.service), "page_bytes", lambda self: max(sizes) + 200)
    pages, after = [], 0
    while True:
        page, _ = await spear.call(client, "get_execution_events", {"execution_id": execution_id, "after_seq": after})
        pages.append([e["seq"] for e in page["events"]])
        if not page["has_more"]:
            break
        after = page["events"][-1]["seq"]
    assert [seq for page in pages for seq in page] == [e["seq"] for e in everything["events"]]  # all, in order
    assert len(pages) >= 2 and all(pages)  # split into pages, none empty


async def test_requests_in_protobufs_json_mapping_are_read_as_its_defaults(spear, client):
    """What a protojson or Go client sends: null for an unset field, 64-bit integers as strings,
    zero for an unset count. Each means what the field's absence means (a parameter's own null
    value is the caller's data and stays)."""
    body = {
        **invoke_body("echo", "ASYNC", value=None),
        "execution_id": None,
        "context": {"timeout_ms": "5000", "max_retries": None, "session_id": None},
        "artifact_spec": None,
    }
    reply, _ = await spear.call(client, "invoke_function", body)
    assert reply["success"] is True, reply
    status, _ = await spear.status_until(client, reply["execution_id"], has_status(ExecutionStatus.COMPLETED))
    assert status["execution"]["timeout_ms"] == 5000 and status["execution"]["max_retries"] == 3  # ASYNC's default
    assert status["result"]["result"] is None  # echo of the null value
    listed, _ = await spear.call(client, "list_executions", {"limit": 0, "task_id": None})
    assert reply["execution_id"] in [e["execution_id"] for e in listed["executions"]]
    task, _ = await spear.call(
        client, "get_task", {"task_id": "demo", "include_executions": True, "execution_limit": 0}
    )
    assert [e["execution_id"] for e in task["executions"]][:1] == [reply["execution_id"]]
    tasks, _ = await spear.call(client, "list_tasks", {"limit": 0})
    assert "demo" in [t["task_id"] for t in tasks["tasks"]]
    refused, _ = await spear.call(client, "list_executions", {"limit": "lots"})
    assert (
        refused["error_code"] == "INVALID_ARGUMENT" and refused["message"] == "limit: expected an integer, got a string"
    )
    refused, _ = await spear.call(client, "list_executions", {"order": "sideways"})
    assert refused["message"].startswith("order: 'sideways' is not one of the values it takes")


async def test_booleans_must_be_sent_as_true_or_false_even_beside_numbers_in_strings(spear, client):
    """probe35: the protojson reading (tried once the strict one failed) read `"false"`, `"true"`,
    `0` and `1` as booleans, so `delete_task {"force": "true"}` forced a delete. protojson refuses
    them; only true and false are booleans, however the rest of the request is written."""
    cases = [
        (
            "invoke_function",
            {**invoke_body("echo", value=1), "force_new_instance": "false"},
            "force_new_instance",
            "a string",
        ),
        (
            "invoke_function",
            {**invoke_body("echo", value=1), "create_if_not_exists": 0},
            "create_if_not_exists",
            "a number",
        ),
        ("get_execution_status", {"execution_id": "x", "include_result": "False"}, "include_result", "a string"),
        ("get_execution_status", {"execution_id": "x", "include_logs": 1}, "include_logs", "a number"),
        ("cancel_execution", {"execution_id": "x", "force": "true"}, "force", "a string"),
        ("delete_task", {"task_id": "demo", "force": "true"}, "force", "a string"),
        ("list_tasks", {"include_details": "true"}, "include_details", "a string"),
    ]
    for operation, body, field, got in cases:
        refused, _ = await spear.call(client, operation, body)
        assert refused.get("error_code") == "INVALID_ARGUMENT", (operation, body, refused)
        assert refused["message"] == f"{field}: expected true or false, got {got}", refused
    nested = {**invoke_body("echo", value=1), "context": {"timeout_ms": "5000"}}
    nested["parameters"][0]["required"] = "true"
    refused, _ = await spear.call(client, "invoke_function", nested)
    assert refused["message"] == "parameters[0].required: expected true or false, got a string", refused
    nested["parameters"][0]["required"] = True  # with a number in a string beside it: taken
    taken, _ = await spear.call(client, "invoke_function", nested)
    assert taken["success"] is True and taken["result"]["result"] == 1, taken
    tasks, _ = await spear.call(client, "list_tasks", {})
    assert "demo" in [t["task_id"] for t in tasks["tasks"]]  # (not deleted)


async def test_a_task_without_executions_reports_its_last_status_as_unknown_never_empty(spear, client):
    tasks, _ = await spear.call(client, "list_tasks", {"include_details": True})
    demo = next(t for t in tasks["tasks"] if t["task_id"] == "demo")
    assert demo["execution_count"] == 0 and demo["last_status"] == "EXECUTION_STATUS_UNKNOWN"
    bare, _ = await spear.call(client, "list_tasks", {})
    assert all(t["last_status"].startswith("EXECUTION_STATUS_") for t in bare["tasks"])


async def test_code_tasks_of_spear_up_are_taken_before_any_worker_published_them(settings, client):
    """`spear up --workers 0` on a new data dir: the demo it loads is known at once (calls wait for
    a worker), not NOT_FOUND until a worker starts somewhere."""
    async with AsyncExitStack() as stack:
        nc = await connect(settings, "test-up-without-workers")
        stack.push_async_callback(nc.close)
        await components.start_projection(stack, nc, settings)
        service = await components.start_service(stack, nc, settings, inline_tasks=[demo])
        await components.start_gateway(stack, service)
        names = Names(settings.subject_prefix)
        reply = await client.request(
            names.api("invoke_function"), json.dumps(invoke_body("echo", "ASYNC", value=1)).encode(), timeout=5
        )
        accepted = json.loads(reply.data)
        assert accepted["success"] is True and accepted["result"]["status"] == ExecutionStatus.PENDING, accepted
        health = json.loads((await client.request(names.api("get_health"), b"{}", timeout=5)).data)
        assert health["status"] == "degraded" and "no worker answers" in health["message"]


def test_a_worker_that_does_not_say_what_it_runs_is_listed_with_what_the_states_say():
    # An older worker's answer on `P.worker.tasks` has no `running` (a rolling upgrade): its
    # running executions come from the states, scanned only while such a worker runs.
    import msgspec

    from spear.core.contract import ListWorkersRequest
    from spear.service.workers import ServiceInfo, WorkerServing, unsaid_running, workers

    old_answer = msgspec.json.decode(b'{"worker_id": "old", "tasks": ["demo"], "instances": {}}', type=WorkerServing)
    assert old_answer.running is None
    infos = [
        ServiceInfo(id="i1", metadata={"worker_id": "new", "tasks": "demo"}),
        ServiceInfo(id="i2", metadata={"worker_id": "old", "tasks": "demo"}),
    ]
    serving = {"new": WorkerServing(worker_id="new", tasks=["demo"], running=["e1"]), "old": old_answer}
    assert unsaid_running(infos, serving) and not unsaid_running(infos[:1], serving)
    listed = workers(infos, ListWorkersRequest(), serving, {"old": ["e2"], "new": ["not-this"]})
    assert [(w.worker_id, w.running_executions) for w in listed.workers] == [("new", ["e1"]), ("old", ["e2"])]


async def test_a_sync_wait_that_ends_while_the_log_cannot_be_read_is_deadline_exceeded_with_its_id(
    settings, client, monkeypatch
):
    """probe58: a SYNC call whose wait ended while its node was frozen was answered UNAVAILABLE,
    without the execution id (the last read of the log, at the deadline, raised). Simulated: once
    the call is stored, every read of an execution's last event fails as a frozen node's does."""
    from spear.core.eventstore import StoreUnavailable

    tuned = with_overrides(settings, sync_execution={"wait_grace_ms": 300})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        assert running.worker is not None
        await running.worker.stop()  # nobody takes the invocation: the wait ends at its deadline
        reads: list[str] = []

        async def frozen(execution_id: str):  # type: ignore[no-untyped-def]
            reads.append(execution_id)
            raise StoreUnavailable("no answer within 5 s (simulated frozen node)")

        monkeypatch.setattr(running.service.store, "last", frozen)
        body = {**invoke_body("echo", value=1), "context": {"timeout_ms": 200}}
        reply, headers = await running.call(client, "invoke_function", body)
        assert reply["success"] is False and reply["error_code"] == "DEADLINE_EXCEEDED", reply
        assert reply["execution_id"] and reads and set(reads) == {reply["execution_id"]}
        assert headers["Nats-Service-Error-Code"] == "504"
