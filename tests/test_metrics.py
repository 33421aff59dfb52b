"""`GET /metrics` parsed with prometheus_client's parser: every seed metric is there and moves when
executions run, under labels of a task made for the test; observability/'s dashboard and alert
rules name only metrics that a run really exposes."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from spear.cli import components
from spear.core.config import with_overrides
from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import Event, Requested, Retrying, Started, StoredResult, cancelled, envelope
from spear.core.state import apply, fold
from spear.projection.intake import Arrived
from spear.worker.tasks import Task
from tests.conftest import Spear
from tests.processes import free_port

OBSERVABILITY = Path(__file__).parent.parent / "observability"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


HOLD_S = 0.3  # how long `hold` keeps the only worker slot after the queue is seen


def probe_task(gate: asyncio.Event) -> Task:
    """A task of its own per test, so the labels (and the counts under them) are the test's.
    `hold` runs until the test opens `gate` (the worker runs in this process)."""
    task = Task(task_id=f"obs{uuid.uuid4().hex[:8]}")

    @task.function
    async def hold() -> str:
        await gate.wait()
        return "released"

    @task.function
    def ok(value: int) -> int:
        return value

    @task.function
    async def slow(ms: int) -> int:
        await asyncio.sleep(ms / 1000)
        return ms

    @task.function
    def boom() -> None:
        raise RuntimeError("boom")

    @task.function
    def hungry(mib: int) -> int:
        block = b"x" * (mib << 20)  # touched, so resident
        return len(block)

    return task


@dataclass
class Running:
    spear: Spear
    http: aiohttp.ClientSession
    task_id: str
    gate: asyncio.Event

    async def invoke(self, client: Any, function: str, mode: str = "SYNC", timeout_ms: int = 0, **params: Any) -> dict:
        body = {
            "task_id": self.task_id,
            "function_name": function,
            "execution_mode": mode,
            "parameters": [{"name": k, "value": v} for k, v in params.items()],
            "context": {"timeout_ms": timeout_ms, "max_retries": 0},
        }
        reply, _ = await self.spear.call(client, "invoke_function", body)
        return reply

    async def scrape(self) -> Samples:
        async with self.http.get("/metrics") as response:
            assert response.status == 200
            text = await response.text()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, samples: Samples, name: str, of_task: bool = True, **labels: str) -> float:
        """The sum over the samples of `name` whose labels include `labels` (and the test's task)."""
        wanted = {"task_id": self.task_id, **labels} if of_task else labels
        return sum(v for (n, ls), v in samples.items() if n == name and wanted.items() <= dict(ls).items())

    async def until(self, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            samples = await self.scrape()
            if check(samples) or loop.time() > end:
                return samples
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def running(settings) -> AsyncIterator[Running]:
    from spear.demo import demo

    tuned = with_overrides(settings, worker={"concurrency": 1})  # a second invocation has to queue
    gate = asyncio.Event()
    task = probe_task(gate)
    port = free_port()
    async with AsyncExitStack() as stack:
        from spear.jetstream.connection import connect

        nc = await connect(tuned, "test-metrics")
        stack.push_async_callback(nc.close)
        worker = await components.start_worker(stack, nc, tuned, [demo, task])
        projection = await components.start_projection(stack, nc, tuned)
        service = await components.start_service(stack, nc, tuned)
        await components.start_gateway(stack, service)
        await components.start_http(stack, service, port, host="127.0.0.1")
        for _ in range(100):  # the gateway has seen the task in the registry
            if service.tasks.get(task.task_id):
                break
            await asyncio.sleep(0.02)
        spear = Spear(tuned, service.names, nc, service, projection, worker)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            yield Running(spear, http, task.task_id, gate)


async def exercise(run: Running, client: Any) -> dict[str, float]:
    """Executions of every kind; returns what the gauges showed while work was under way."""
    seen: dict[str, float] = {}
    for value in range(3):
        assert (await run.invoke(client, "ok", value=value))["result"]["status"] == ExecutionStatus.COMPLETED
    failed = await run.invoke(client, "boom")
    assert failed["result"]["status"] == ExecutionStatus.FAILED
    timed_out = await run.invoke(client, "slow", timeout_ms=100, ms=2000)
    assert timed_out["result"]["status"] == ExecutionStatus.TIMEOUT
    hungry = await run.invoke(client, "hungry", mib=64)
    assert hungry["result"]["memory_used_bytes"] >= 16 << 20, hungry["result"]

    # One worker slot: a SYNC call of `hold` keeps it until the gate opens, so the ASYNC one
    # behind it waits in the queue, at least HOLD_S.
    sync_call = asyncio.ensure_future(run.invoke(client, "hold"))
    samples = await run.until(lambda s: run.value(s, "spear_concurrent_requests", function_name="hold") == 1)
    seen["concurrent"] = run.value(samples, "spear_concurrent_requests", function_name="hold")
    queued = await run.invoke(client, "slow", mode="ASYNC", ms=10)
    assert queued["estimated_completion_ms"] > 0
    await asyncio.sleep(0.6)  # (the figures read when it was admitted are older than a scrape takes)
    samples = await run.scrape()  # the first scrape shows it (probe30: one scrape late)
    seen["queue"] = run.value(samples, "spear_queue_length")
    seen["pending"] = run.value(samples, "spear_pending_executions")
    await asyncio.sleep(HOLD_S)  # a known least wait for the queued invocation
    run.gate.set()
    assert (await sync_call)["result"]["status"] == ExecutionStatus.COMPLETED
    for _ in range(200):
        status, _ = await run.spear.call(client, "get_execution_status", {"execution_id": queued["execution_id"]})
        if status["result"]["status"] == ExecutionStatus.COMPLETED:
            break
        await asyncio.sleep(0.02)
    await run.spear.caught_up()
    return seen


async def test_every_seed_metric_is_exposed_and_moves(running, client):
    run = running
    before = await run.scrape()
    seen = await exercise(run, client)
    await asyncio.sleep(0.6)  # (every figure read before the queue drained is older than a scrape takes)
    after = await run.scrape()  # the first scrape shows it drained (probe30: it showed the last one's)

    def grew(name: str, by: float = 1, of_task: bool = True, **labels: str) -> bool:
        return run.value(after, name, of_task, **labels) - run.value(before, name, of_task, **labels) >= by

    completed, timeout = ExecutionStatus.COMPLETED, ExecutionStatus.TIMEOUT
    # SYNC: execution_time, success_rate, timeout_rate, concurrent_requests, memory_usage
    assert grew("spear_execution_time_milliseconds_count", 3, function_name="ok")
    assert grew("spear_execution_time_milliseconds_sum", HOLD_S * 1000, function_name="hold")
    assert grew("spear_executions_finished_total", 3, function_name="ok", status=completed)
    assert grew("spear_executions_finished_total", 1, function_name="slow", status=timeout)
    assert grew("spear_attempts_finished_total", 1, function_name="boom", status=ExecutionStatus.FAILED)
    # which failure it was, apart from a worker lost (probe54: both only FAILED)
    assert grew("spear_attempts_finished_total", 1, function_name="boom", error_code="FUNCTION_ERROR")
    assert grew("spear_attempts_finished_total", 1, function_name="slow", error_code="TIMEOUT")
    assert run.value(after, "spear_success_rate", function_name="ok") == 1.0
    assert run.value(after, "spear_success_rate", function_name="boom") == 0.0
    assert run.value(after, "spear_timeout_rate", function_name="slow") == 1 / 2  # 1 of its 2 executions
    assert seen["concurrent"] == 1 and run.value(after, "spear_concurrent_requests", function_name="hold") == 0
    assert grew("spear_memory_usage_bytes_sum", 16 << 20, function_name="hungry")
    assert run.value(after, "spear_process_memory_usage_bytes", of_task=False) > 0
    # request times split the first millisecond, where a quick SYNC call falls (probe54)
    bounds = {dict(ls).get("le") for (n, ls) in after if n == "spear_request_duration_milliseconds_bucket"}
    assert {"0.25", "0.5", "0.75", "1"} <= bounds, sorted(b for b in bounds if b)
    # ASYNC: queue_length, pending_executions, completion_rate, average_wait_time, status_query_frequency
    assert seen["queue"] == 1 and seen["pending"] == 2
    assert run.value(after, "spear_pending_executions") == 0
    assert run.value(after, "spear_completion_rate_per_second", function_name="ok") > 0
    assert grew("spear_average_wait_time_milliseconds_count", 1, function_name="slow")
    assert grew("spear_average_wait_time_milliseconds_sum", HOLD_S * 1000, function_name="slow")  # behind `hold`
    assert grew("spear_status_queries_total", 1, of_task=False, found="true")
    assert run.value(after, "spear_status_query_frequency_per_second", of_task=False) > 0


def _names_in(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def promql_metric_names(expression: str) -> set[str]:
    """The metric names an expression reads, roughly: identifiers that are neither functions,
    keywords, label names in braces or by(...), nor durations."""
    stripped = re.sub(r"\{[^}]*\}", "", expression)  # label matchers
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r'"[^"]*"', "", stripped)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?", stripped):
        word = match.group(0)
        if word.rstrip().endswith("(") or word in PROMQL_WORDS:
            continue
        names.add(word)
    return {n for n in names if n.startswith("spear_")}


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "grafana" / "spear-dashboard.json").read_text())
    targets = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return targets + variables


def _rule_expressions() -> list[str]:
    """The `expr:` values of the rules file, folded block scalars (`>-`) included."""
    lines = (OBSERVABILITY / "prometheus" / "alerts.yml").read_text().splitlines()
    expressions = []
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2).strip()
        if rest not in (">-", ">", "|", "|-"):
            expressions.append(rest)
            continue
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        expressions.append(" ".join(block).strip())
    return expressions


def _rule_names() -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\S+)", (OBSERVABILITY / "prometheus" / "alerts.yml").read_text(), re.M))


async def test_the_workers_serving_each_task_are_a_gauge_zero_where_none_does(running):
    """probe58: SpearNoWorkers looked for pending invocations none was held by a worker; those of
    workers that crashed stay held until handed out again, so the alert never fired in that case.
    It now reads the workers serving the task."""
    samples = await running.until(lambda s: running.value(s, "spear_task_workers") >= 1)
    assert running.value(samples, "spear_task_workers") == 1, samples
    tasks = running.spear.service.tasks
    tasks.code["nobody-serves-it"] = tasks.get(running.task_id)  # type: ignore[assignment]  # (known, unserved)

    def unserved(samples: Samples) -> list[float]:
        return [
            v for (n, ls), v in samples.items() if n == "spear_task_workers" and ("task_id", "nobody-serves-it") in ls
        ]

    samples = await running.until(lambda s: bool(unserved(s)))
    assert unserved(samples) == [0], samples


def test_a_rule_joining_an_aggregation_says_which_labels_match():
    """probe54: `x > 0 and sum(y) == 0` never fires: `and` matches identical label sets, and the
    sum keeps none. A set operator before an aggregation without `by` needs `on (...)`."""
    unmatched = [
        expression
        for expression in _rule_expressions()
        if re.search(r"\b(and|or|unless)\s+(sum|min|max|avg|count|stddev|quantile)\s*\(", expression)
    ]
    assert not unmatched, unmatched


async def test_the_dashboard_and_alert_rules_name_only_metrics_that_exist(running, client):
    await exercise(running, client)
    exposed = _names_in(await running.scrape())
    dashboard, rules = _dashboard_expressions(), _rule_expressions()
    assert len(dashboard) >= 10 and len(rules) >= 5
    used = set().union(*(promql_metric_names(e) for e in dashboard + rules))
    assert used, "no spear metric found in the expressions"
    assert used <= exposed, f"not on /metrics: {sorted(used - exposed)}"
    assert {"SpearQueueGrowing", "SpearErrorRate", "SpearTimeouts", "SpearProjectionLag", "SpearNoWorkers"} <= (
        _rule_names()
    )


def test_the_promql_name_parser_reads_metric_names_only():
    expression = (
        'sum by (task_id) (rate(spear_executions_finished_total{status="X"}[5m])) '
        "/ ignoring(status) sum(rate(spear_attempts_finished_total[5m])) > 0.1 and on() spear_queue_length offset 5m"
    )
    assert promql_metric_names(expression) == {
        "spear_executions_finished_total",
        "spear_attempts_finished_total",
        "spear_queue_length",
    }


def test_a_rate_right_after_start_averages_over_the_time_since_the_process_started(monkeypatch):
    """One execution 30 s after start is 1/30 per second, not a spike of 1 per second (the time
    since the first event), whenever the rate's instruments were made."""
    import time

    from spear.telemetry import metrics

    monkeypatch.setattr(metrics, "STARTED", time.monotonic() - 30)
    rate, recent = metrics.Rate(), metrics.Recent(("task_id",))
    rate.tick()
    recent.finished(("demo",), "COMPLETED")
    [observed] = rate.observe(None)  # type: ignore[arg-type]
    [per_task] = recent.per_second()
    assert 1 / 31 < observed.value < 1 / 29 and 1 / 31 < per_task.value < 1 / 29


async def test_executions_that_end_while_the_projection_is_down_are_counted_once_it_is_back(running, client):
    """probe36: the events stored before a projection started were never counted ("counted by
    whoever folded them first"), so the executions that ended while it was down were counted by
    nobody. Those delivered for the first time are now counted by the projection that folds them."""
    from spear.projection.projection import Projection

    run = running
    before = await run.scrape()
    await run.spear.projection.stop()
    ended = [await run.invoke(client, "ok", value=value) for value in range(4)]
    assert all(reply["result"]["status"] == ExecutionStatus.COMPLETED for reply in ended), ended
    back = Projection(run.spear.nc, run.spear.settings)
    await back.start()
    try:
        last = ended[-1]["execution_id"]

        def grown(samples: Samples) -> bool:
            counted = run.value(samples, "spear_executions_finished_total", function_name="ok")
            return counted - run.value(before, "spear_executions_finished_total", function_name="ok") >= 4

        for _ in range(1000):
            if await run.spear.service.projected_state(last):
                break
            await asyncio.sleep(0.02)
        after = await run.until(grown, timeout=10)
        counted = run.value(after, "spear_executions_finished_total", function_name="ok")
        assert counted - run.value(before, "spear_executions_finished_total", function_name="ok") == 4
    finally:
        await back.stop()


async def test_an_event_delivered_twice_in_a_batch_is_measured_once(running, client):
    """review44: a projection slower than its consumer's ack wait gets events again while their
    first delivery waits in its hands; both copies come in one batch, and each was measured."""
    run = running
    reply = await run.invoke(client, "ok", value=1)
    history = await run.spear.service.store.history(reply["execution_id"])
    await run.spear.caught_up()
    before = await run.scrape()
    projection = run.spear.projection
    state = fold(history)
    after_seq = projection.born_seq + 10_000  # (stored after it started: each first delivery counts)
    items = [Arrived(stored.event, after_seq + n, None) for n, stored in enumerate(history)]  # type: ignore[arg-type]
    projection._measure(state, [*items, *items[1:]], 0, running=False)  # `started`, `completed` again
    after = await run.scrape()

    def grew(name: str) -> float:
        return run.value(after, name, function_name="ok") - run.value(before, name, function_name="ok")

    assert grew("spear_executions_finished_total") == 1
    assert grew("spear_attempts_finished_total") == 1


async def test_a_cancel_of_a_pending_execution_ends_no_attempt_in_the_metrics(running, client):
    """probe42: `spear_attempts_finished_total{status="CANCELLED"}` counted executions cancelled
    before any attempt ran (47 against 33 that ever started)."""
    run = running
    run.gate.clear()
    holding = await run.invoke(client, "hold", mode="ASYNC")  # the worker's one slot: what comes next waits
    waiting = [await run.invoke(client, "slow", mode="ASYNC", ms=5_000) for _ in range(3)]
    await asyncio.sleep(0.6)  # (a scrape within 0.5 s of the last is answered from it)
    before = await run.scrape()
    cancelled = []
    for reply in waiting:
        status, _ = await run.spear.call(client, "get_execution_status", {"execution_id": reply["execution_id"]})
        answer, _ = await run.spear.call(client, "cancel_execution", {"execution_id": reply["execution_id"]})
        if status["result"]["status"] == ExecutionStatus.PENDING and answer.get("success"):
            cancelled.append(reply["execution_id"])
    run.gate.set()
    await run.spear.caught_up()
    await asyncio.sleep(0.6)
    after = await run.scrape()

    def grew(name: str, function_name: str) -> float:
        labels = {"function_name": function_name, "status": ExecutionStatus.CANCELLED}
        return run.value(after, name, **labels) - run.value(before, name, **labels)

    assert holding["success"]
    started = 0
    for execution_id in cancelled:
        history = await run.spear.service.store.history(execution_id)
        started += any(stored.event.kind == "started" for stored in history)
    assert grew("spear_executions_finished_total", "slow") == len(cancelled) >= 1
    assert grew("spear_attempts_finished_total", "slow") == started


async def test_a_cancel_while_a_retry_waits_ends_no_attempt_in_the_metrics(running, client):
    """review46: an execution waiting for its next attempt (after `retrying`) that was cancelled
    counted a CANCELLED attempt: its `cancelled` carries the first attempt's start."""
    run = running
    projection = run.spear.projection
    request = Requested(
        execution_id="RETRY-CANCEL",
        task_id=run.task_id,
        function_name="boom",
        at="2026-12-01T00:00:00.000Z",
        execution_mode=ExecutionMode.ASYNC,
    )
    failed = StoredResult(status=ExecutionStatus.FAILED, error_code="FUNCTION_ERROR", attempt=1)
    history: list[Event] = [
        request,
        Started(**envelope(request, 1)),
        Retrying(**envelope(request, 1), result=failed, delay_ms=60_000),
        cancelled(envelope(request, 1), "by the test", started_at="2026-12-01T00:00:00.100Z"),
    ]
    seq = projection.born_seq + 20_000
    items = [Arrived(event, seq + n, None) for n, event in enumerate(history)]  # type: ignore[arg-type]
    await asyncio.sleep(0.6)  # (a scrape within 0.5 s of the last is answered from it)
    before = await run.scrape()
    projection._measure(fold_events(history, seq), items, 0, running=False)
    await asyncio.sleep(0.6)
    after = await run.scrape()

    def grew(name: str, status: str) -> float:
        labels = {"function_name": "boom", "status": status}
        return run.value(after, name, **labels) - run.value(before, name, **labels)

    assert grew("spear_attempts_finished_total", ExecutionStatus.FAILED) == 1  # the one attempt that ran
    assert grew("spear_attempts_finished_total", ExecutionStatus.CANCELLED) == 0
    assert grew("spear_executions_finished_total", ExecutionStatus.CANCELLED) == 1


def fold_events(events: list[Event], first_seq: int):
    state = None
    for n, event in enumerate(events):
        state = apply(state, event, first_seq + n)
    assert state is not None
    return state
