"""spear as real processes: worker processes sharing work, `spear up` stopped and restarted."""

import asyncio
import json
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import nats
import pytest

from spear.aio import poll_until
from spear.core.enums import ExecutionStatus
from spear.core.events import TERMINAL_KINDS
from tests.conftest import has_status, invoke_body, start_spear, until_registered
from tests.processes import (
    PROCESS_START_S,
    child_processes,
    free_port,
    spawn,
    spawn_worker,
    stop,
    until_responders,
    wait_for_pullers,
    wait_ready,
)

# Real processes: in the full run (CI), not in the quick loop (-m "not slow").
pytestmark = pytest.mark.slow


async def test_two_worker_processes_split_200_async_invocations_exactly_once(settings, client, nats_url, tmp_path):
    stack = AsyncExitStack()
    running = await start_spear(stack, settings, with_worker=False)
    workers = [  # two executions at a time each, so the batch needs both
        await spawn(
            "worker",
            "--nats-url",
            nats_url,
            "--concurrency",
            "2",
            prefix=settings.subject_prefix,
            log_path=tmp_path / f"w{i}.log",
        )
        for i in range(2)
    ]
    try:
        await until_responders(client, running.names.worker_service_name, 2)
        await until_registered(running, "demo")
        await wait_for_pullers(client, running.names.stream, "worker-demo", 2)
        terminal = []

        async def collect(msg):
            terminal.append(json.loads(msg.data))

        for subject in running.names.terminal_events():
            await client.subscribe(subject, cb=collect)
        await client.flush()
        ids = []
        for _i in range(200):
            reply, _ = await running.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=10))
            assert reply["success"], reply
            ids.append(reply["execution_id"])
        for _ in range(300):
            if len(terminal) >= 200:
                break
            await asyncio.sleep(0.05)
        assert sorted(event["execution_id"] for event in terminal) == sorted(ids)  # each once
        assert {event["result"]["status"] for event in terminal} == {ExecutionStatus.COMPLETED}
        worker_ids = set()
        for execution_id in ids:
            history = await running.service.store.history(execution_id)
            kinds = [event.kind for event, _ in history]
            assert kinds == ["requested", "started", "completed"], kinds
            assert sum(kind in TERMINAL_KINDS for kind in kinds) == 1
            worker_ids.add(history[1].event.worker_id)
        assert len(worker_ids) == 2, "both worker processes took a share"
    finally:
        codes = [await stop(worker) for worker in workers]
        await stack.aclose()
        assert codes == [0, 0]


async def test_spear_up_restart_keeps_every_execution(tmp_path):
    data_dir = tmp_path / "data"
    http_port = free_port()
    args = ("up", "--data-dir", str(data_dir), "--nats-port", "-1", "--http-port", str(http_port))
    up = await spawn(*args, log_path=tmp_path / "up.log")
    try:
        url = await wait_ready(up)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{http_port}/api/v1/health") as response,
        ):
            assert response.status == 200
            assert (await response.json())["status"] == "healthy"
        cli = await spawn("invoke", "demo", "calculate_fibonacci", "n=30", "--json", "--nats-url", url)
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        sync_reply = json.loads(out)
        assert sync_reply["result"]["result"] == 832040
        cli = await spawn("invoke", "demo", "sleep", "ms=20", "--async", "--json", "--nats-url", url)
        out, _ = await cli.communicate()
        async_id = json.loads(out)["execution_id"]
        nc = await nats.connect(url)
        pending_ids = []
        for _ in range(20):  # some may still be pending at the stop: they must finish after the restart
            reply = await nc.request(
                "spear.api.invoke_function", json.dumps(invoke_body("sleep", mode="ASYNC", ms=50)).encode(), timeout=5
            )
            pending_ids.append(json.loads(reply.data)["execution_id"])
        await nc.close()
    finally:
        assert await stop(up) == 0
    up = await spawn(*args, log_path=tmp_path / "up.log")
    try:
        url = await wait_ready(up)
        cli = await spawn("status", sync_reply["execution_id"], "--json", "--nats-url", url)
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        status = json.loads(out)
        assert status["found"] is True and status["result"]["result"] == 832040
        nc = await nats.connect(url)
        for execution_id in [async_id, *pending_ids]:
            for _ in range(300):  # an invocation in flight at the stop comes back within ack_wait (10 s)
                reply = await nc.request(
                    "spear.api.get_execution_status", json.dumps({"execution_id": execution_id}).encode(), timeout=5
                )
                status = json.loads(reply.data)
                if status["found"] and status["result"]["status"] == ExecutionStatus.COMPLETED:
                    break
                await asyncio.sleep(0.05)
            assert status["found"] is True and status["result"]["status"] == ExecutionStatus.COMPLETED, status
        await nc.close()
    finally:
        assert await stop(up) == 0


async def _until_the_parts_serve(client, prefix: str) -> None:
    """Until the projection, a worker and the gateway run apart answer, and a SYNC `echo` through
    them returns its value (the gateway learns the demo task from the registry the worker fills)."""
    for service_name in (f"{prefix}-projection", f"{prefix}-worker", prefix):
        await until_responders(client, service_name, 1)
    subject = f"{prefix}.api.invoke_function"
    reply: dict = {}
    for _ in range(50):
        reply = json.loads((await client.request(subject, json.dumps(invoke_body("echo", value=7)).encode(), 5)).data)
        if reply.get("success"):
            break
        await asyncio.sleep(0.1)
    assert reply["result"]["result"] == 7


async def test_each_component_runs_alone_as_its_own_process(settings, client, nats_url, tmp_path):
    prefix = settings.subject_prefix
    http_port = free_port()
    processes = [
        await spawn(component, "--nats-url", nats_url, prefix=prefix, log_path=tmp_path / f"{component}.log")
        for component in ("projection", "worker", "gateway")
    ]
    processes.append(
        await spawn(
            "api", "--nats-url", nats_url, "--http-port", str(http_port), prefix=prefix, log_path=tmp_path / "api.log"
        )
    )
    try:
        await _until_the_parts_serve(client, prefix)
        subject = f"{prefix}.api.invoke_function"
        body = json.dumps(invoke_body("quick_calculation", mode="ASYNC", input="21")).encode()
        accepted = json.loads((await client.request(subject, body, 5)).data)
        status_subject = f"{prefix}.api.get_execution_status"
        for _ in range(100):
            request = json.dumps({"execution_id": accepted["execution_id"]}).encode()
            status = json.loads((await client.request(status_subject, request, 5)).data)
            if status["result"]["status"] == ExecutionStatus.COMPLETED:
                break
            await asyncio.sleep(0.05)
        assert status["result"]["result"] == 42
        async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as http:  # `spear api` alone
            for _ in range(int(PROCESS_START_S * 10)):
                try:
                    async with http.get(f"/api/v1/execution/{accepted['execution_id']}/status") as response:
                        body = await response.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            assert body["result"]["result"] == 42
    finally:
        codes = [await stop(process) for process in processes]  # stop them all before judging
        for component, code in zip(("projection", "worker", "gateway", "api"), codes, strict=False):
            log = tmp_path / f"{component}.log"
            assert code == 0, f"{component}: {log.read_text()[-3000:]}"


def _documented_metrics() -> dict[str, str]:
    """observability/README.md's metrics table: each metric's name and who records it."""
    rows = Path(__file__).parent.parent.joinpath("observability", "README.md").read_text().splitlines()
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if row.startswith("| `spear_")]
    return {row[0].split("`")[1]: row[-1] for row in cells}


async def _exposed(port: int) -> set[str]:
    """The spear metric families a process's /metrics shows (a histogram by its name)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http:
        text = await poll_until(
            lambda: _get(http, f"http://127.0.0.1:{port}/metrics"),
            timeout_s=PROCESS_START_S,
            retry_on=lambda exc: isinstance(exc, aiohttp.ClientConnectionError),
        )
    names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    documented = set(_documented_metrics())
    for suffix in ("_bucket", "_sum", "_count"):
        names = {name.removesuffix(suffix) if name.removesuffix(suffix) in documented else name for name in names}
    return {name for name in names if name.startswith("spear_")}


async def _get(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as response:
        assert response.status == 200
        return await response.text()


async def test_each_component_apart_shows_on_its_metrics_port_only_what_it_records(
    settings, client, nats_url, tmp_path
):
    """observability/README.md: with `metrics_port`, `spear worker` shows its process memory and
    `spear projection` the execution metrics (and its memory); the status query rate is the
    gateway's. It was on the worker's and the projection's /metrics too, always 0."""
    documented = _documented_metrics()
    everywhere = {name for name, by in documented.items() if by == "every process"}
    projections = {name for name, by in documented.items() if by == "projection"} | everywhere
    gateways = {name for name, by in documented.items() if by.startswith("gateway / API")} | everywhere
    assert "spear_status_query_frequency_per_second" in gateways and len(projections) > 5
    prefix = settings.subject_prefix
    ports = {component: free_port() for component in ("projection", "worker", "gateway")}
    processes = [
        await spawn(
            component,
            "--nats-url",
            nats_url,
            prefix=prefix,
            log_path=tmp_path / f"{component}.log",
            env={"SPEAR_TELEMETRY__METRICS_PORT": str(port)},
        )
        for component, port in ports.items()
    ]
    try:
        await _until_the_parts_serve(client, prefix)
        # (the projection folds the execution on its own time: until its metrics show it)
        projection = await poll_until(
            lambda: _exposed(ports["projection"]), lambda names: names >= projections, timeout_s=10
        )
        worker = await _exposed(ports["worker"])
        gateway = await _exposed(ports["gateway"])
    finally:
        codes = [await stop(process) for process in processes]
    assert codes == [0, 0, 0], codes
    assert worker == everywhere, worker
    assert projection == projections, projection
    assert "spear_status_query_frequency_per_second" in gateway and gateway <= gateways, gateway


@pytest.mark.parametrize(
    ("first", "hint"),
    [(signal.SIGTERM, "SIGINT twice stops at once"), (signal.SIGINT, "a second Ctrl-C stops at once")],
)
async def test_a_stopping_worker_names_what_stops_it_at_once_as_its_stop_began(
    settings, client, nats_url, tmp_path, first, hint
):
    """A worker stopped while a function runs says how long it waits, and what stops it at once.
    It said "a second Ctrl-C" after SIGTERM too (systemd's stop, no terminal), where a second
    SIGTERM does not hurry it (it never does: systemd may send two). What it names does."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        log_path = tmp_path / "worker.log"
        worker = await spawn_worker(stack, nats_url, settings.subject_prefix, log_path)
        await wait_for_pullers(client, running.names.stream, running.names.worker_consumer("demo"), 1)
        reply, _ = await running.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=60_000))
        execution_id = reply["execution_id"]
        await running.status_until(client, execution_id, has_status(ExecutionStatus.RUNNING), timeout=PROCESS_START_S)
        worker.send_signal(first)
        said = await poll_until(
            lambda: asyncio.sleep(0, log_path.read_text()), lambda text: "waiting up to" in text, timeout_s=10
        )
        (line,) = [line for line in said.splitlines() if "waiting up to" in line]
        assert f"for 1 running execution(s) ({hint}): {execution_id} (sleep, attempt 1)" in line, line
        if first == signal.SIGTERM:
            worker.send_signal(signal.SIGTERM)
            await asyncio.sleep(1)
            assert worker.returncode is None  # still waiting for its execution
            worker.send_signal(signal.SIGINT)
            await asyncio.sleep(0.3)  # (two signals sent together may arrive as one)
        worker.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(worker.wait(), 5) == 128 + signal.SIGINT
        assert "stopping at once" in log_path.read_text()


async def test_spear_up_stops_cleanly_on_ctrl_c(tmp_path):
    up = await spawn("up", "--data-dir", str(tmp_path), "--nats-port", "-1", "--http-port", str(free_port()))
    await wait_ready(up)
    (ports_file,) = (tmp_path / "nats" / "ports").glob("*.ports")
    nats_pid = int(ports_file.stem.rsplit("_", 1)[1])
    os.kill(nats_pid, 0)  # the embedded server runs
    up.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.wait(), 30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(nats_pid, 0)  # and was stopped with it


@pytest.mark.parametrize("when", ["while_the_worker_waits", "before_the_workers_are_told"])
async def test_a_second_ctrl_c_stops_spear_up_at_once_and_its_processes_with_it(tmp_path, when):
    """probe39: the first Ctrl-C waits up to the worker's grace (10 s) for running functions, and
    a second one was ignored. It now stops spear up at once, and its processes with it: also when
    it comes while spear up still answers a SYNC call, before its workers were told to stop
    (review43: they then began a clean stop of their own, orphaned, with NATS gone)."""
    log_path = tmp_path / "up.log"
    up = await spawn(
        "up", "--data-dir", str(tmp_path), "--nats-port", "-1", "--http-port", str(free_port()), log_path=log_path
    )
    url = await wait_ready(up)
    children = child_processes(up.pid)
    nc = await nats.connect(url)
    mode = "ASYNC" if when == "while_the_worker_waits" else "SYNC"
    body = json.dumps(invoke_body("sleep", mode=mode, ms=60_000)).encode()
    call = asyncio.ensure_future(nc.request("spear.api.invoke_function", body, timeout=30))

    async def running() -> int:
        stats = await nc.request("spear.api.get_stats", b"{}", timeout=5)
        return int(json.loads(stats.data)["execution_stats"]["running_executions"])

    await poll_until(running, lambda count: count == 1, timeout_s=20, what="running")
    up.send_signal(signal.SIGINT)
    if when == "while_the_worker_waits":
        await poll_until(
            lambda: asyncio.sleep(0, log_path.read_text()), lambda said: "waiting up to" in said, timeout_s=10
        )
    else:
        await asyncio.sleep(0.3)  # spear up waits for the SYNC call's answer before it stops its workers
    up.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.wait(), 5) == 128 + signal.SIGINT
    said = log_path.read_text()
    assert "a second Ctrl-C stops at once" in said and "stopping at once" in said, said

    async def survivors() -> list[int]:
        return [pid for pid in children if _alive(pid)]

    assert await poll_until(survivors, lambda alive: not alive, timeout_s=3, what="children gone") == []
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    await nc.close()


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGHUP,)],
    ids=["two_sigterms", "a_hang_up"],
)
async def test_a_stop_signal_stops_a_worker_cleanly(settings, client, tmp_path, signals):
    """review43: systemd signals a unit's whole cgroup at once (and `pkill` every process), so a
    worker of spear up can get SIGTERM twice in one clean stop: the second must not force it out
    before its running work ends or is handed back. probe67: SIGHUP (the terminal or ssh session a
    worker was started from closed) killed it silently, and its running attempt was lost
    (WORKER_LOST, a retry used) ~13 s later; it is a clean stop too."""
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await spawn_worker(stack, settings.nats.urls[0], running.names.prefix, tmp_path / "w.log")
        await until_registered(running, "demo", PROCESS_START_S)
        accepted, _ = await running.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=1500))
        execution_id = accepted["execution_id"]
        await running.status_until(client, execution_id, has_status(ExecutionStatus.RUNNING), PROCESS_START_S)
        for sent, sig in enumerate(signals):
            if sent:
                await asyncio.sleep(0.2)
            worker.send_signal(sig)
        assert await asyncio.wait_for(worker.wait(), 20) == 0
        reply, _ = await running.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
        assert reply["result"]["attempt"] == 1, reply  # it ran to its end, not lost and run again
        said = (tmp_path / "w.log").read_text()
        assert "stopping" in said and "stopping at once" not in said, said


async def test_a_bad_config_file_stops_start_up_with_a_clear_message(tmp_path):
    config = tmp_path / "spear.toml"
    config.write_text("[sync_execution]\ndefault_timeout_ms = 30000\nmax_concurent_requests = 5\n")
    process = await spawn("--config", str(config), "up", "--data-dir", str(tmp_path), log_path=tmp_path / "up.log")
    assert await asyncio.wait_for(process.wait(), 30) == 2
    assert "max_concurent_requests" in (tmp_path / "up.log").read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has died; only its (dead) parent could reap it


@pytest.mark.slow  # real processes: spear up, its nats-server and worker
async def test_a_killed_spear_up_leaves_no_orphans_and_a_data_dir_has_one_owner(tmp_path):
    data_dir = tmp_path / "data"
    args = ("up", "--data-dir", str(data_dir), "--nats-port", "-1", "--http-port", str(free_port()))
    up = await spawn(*args, log_path=tmp_path / "up.log")
    await wait_ready(up)
    children = child_processes(up.pid)
    assert len(children) >= 2, children  # nats-server and a worker process, in sessions of their own
    second = await spawn(*args[:-1], str(free_port()), log_path=tmp_path / "second.log")
    assert await asyncio.wait_for(second.wait(), 30) == 2  # the data dir is taken: a clear refusal
    said = (tmp_path / "second.log").read_text()
    assert f"in use by spear up (pid {up.pid})" in said, said
    up.kill()  # SIGKILL: spear up cannot stop anything itself
    await up.wait()

    async def survivors() -> list[int]:
        return [pid for pid in children if _alive(pid)]

    assert await poll_until(survivors, lambda alive: not alive, timeout_s=20, what="children gone") == []
    again = await spawn(*args, log_path=tmp_path / "again.log")  # the same data dir, at once usable
    try:
        await wait_ready(again)
    finally:
        assert await stop(again) == 0


def test_the_worker_processes_of_spear_up_get_its_nats_urls_in_their_environment_not_argv(settings, monkeypatch):
    """review27: `--nats-url <urls>` on their command lines showed a password in a URL to every
    local user (`ps`, /proc/<pid>/cmdline)."""
    from spear.cli.supervisor import ChildProcesses
    from spear.core.config import load_settings, with_overrides

    monkeypatch.setenv("SPEAR_NATS__URLS", "nats://elsewhere:4222")  # (spear up's own: not the children's)
    urls = ["nats://alice:s3cretPW@127.0.0.1:4222", "nats://alice:s3cretPW@127.0.0.1:4223"]
    children = ChildProcesses(with_overrides(settings, nats={"urls": urls}), 1)
    assert not any("s3cretPW" in arg for arg in children.command()), children.command()
    env = children.environment()
    assert load_settings(None, env).nats.urls == urls  # what a child reads
