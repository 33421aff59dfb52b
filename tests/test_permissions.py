"""The least-privilege NATS users of deploy/, enforced by a real nats-server: a client cannot write
the log or touch JetStream, and every component works with its own role only."""

import asyncio
import json
import re
import secrets
import shutil
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import nats.errors
import pytest
import pytest_asyncio

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import load_settings, with_overrides
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream.connection import connect
from spear.jetstream.embedded import EmbeddedNats, server_binary
from spear.jetstream.permissions import ROLES, environment_variable, users_file
from spear.projection.projection import rebuild
from spear.worker.worker import Worker
from tests.conftest import invoke_body
from tests.processes import free_port, spawn, stop, wait_ready
from tests.test_rolling_upgrade import new, old

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NAMES = Names("spear")  # deploy/ is made for the default prefix


def test_the_deploy_files_are_the_generated_users_and_a_valid_config(monkeypatch):
    assert (DEPLOY / "spear-users.conf").read_text() == users_file(NAMES)
    for role in ROLES:
        monkeypatch.setenv(environment_variable(role), "pw")
    checked = subprocess.run(
        [server_binary(), "-c", str(DEPLOY / "nats-server.conf"), "-t"], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout


class Secured:
    """A nats-server enforcing deploy/spear-users.conf, passwords from its environment."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch):
        # nats-server parses a variable as a config value: a password starting with a digit would be a number
        self.passwords = {role: "p" + secrets.token_hex(16) for role in ROLES}
        for role, password in self.passwords.items():
            monkeypatch.setenv(environment_variable(role), password)
        directory.mkdir(parents=True, exist_ok=True)  # nats-server includes relative to its config
        shutil.copy(DEPLOY / "spear-users.conf", directory / "spear-users.conf")
        self.server = EmbeddedNats(directory, port=-1, extra_config='include "spear-users.conf"')
        self.url = self.server.start()

    def settings(self, role: str):
        return with_overrides(
            load_settings(), nats={"urls": [self.url], "user": role, "password": self.passwords[role]}
        )

    async def client(self, role: str = "client", errors: list[str] | None = None):
        async def error_cb(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        return await nats.connect(
            self.url, user=role, password=self.passwords[role], error_cb=error_cb, allow_reconnect=False
        )

    def violations(self) -> list[str]:
        log = (self.server.data_dir / "nats-server.log").read_text()
        return re.findall(r".*Violation.*", log)


@pytest.fixture
def secured(tmp_path, monkeypatch):
    server = Secured(tmp_path, monkeypatch)
    yield server
    server.server.stop()


async def start_roles(stack: AsyncExitStack, secured: Secured, **overrides: dict) -> None:
    """gateway, worker and projection, each on its own connection with its own role."""
    settings = {role: with_overrides(secured.settings(role), **overrides) for role in ROLES}
    connections = {}
    for role in ("gateway", "worker", "projection"):
        connections[role] = await connect(settings[role], f"spear-{role}")
        stack.push_async_callback(connections[role].close)
    service = await components.start_service(stack, connections["gateway"], settings["gateway"])
    await components.start_gateway(stack, service)
    await components.start_projection(stack, connections["projection"], settings["projection"])
    await components.start_worker(stack, connections["worker"], settings["worker"], [demo])


@pytest_asyncio.fixture
async def running(secured):
    async with AsyncExitStack() as stack:
        await start_roles(stack, secured)
        yield


async def _request(nc, operation: str, body: dict) -> dict:
    return json.loads((await nc.request(NAMES.api(operation), json.dumps(body).encode(), timeout=10)).data)


async def test_every_component_works_with_its_own_role(secured, running):
    client = await secured.client()
    seen: list[str] = []

    async def note(msg) -> None:
        seen.append(msg.subject.split(".")[-1])

    await client.subscribe(f"{NAMES.prefix}.exec.>", cb=note)  # completion notifications
    try:
        body = invoke_body("echo", value="x")
        body["context"] = {"headers": {"Authorization": "Bearer secret"}}
        sync = await _request(client, "invoke_function", body)
        assert sync["success"] and sync["result"]["result"] == "x"
        started = await _request(client, "invoke_function", invoke_body("echo", "ASYNC", value="y"))
        assert started["success"] and started["result"]["status"] == "EXECUTION_STATUS_PENDING"
        for _ in range(200):
            status = await _request(client, "get_execution_status", {"execution_id": started["execution_id"]})
            if status["found"] and status["result"]["status"] == "EXECUTION_STATUS_COMPLETED":
                break
            await asyncio.sleep(0.02)
        assert status["result"]["result"] == "y"
        health = await _request(client, "get_health", {"include_details": True})
        assert health["status"] == "healthy", health  # the gateway pings worker and projection
        workers = await _request(client, "list_workers", {})
        assert len(workers["workers"]) == 1, workers  # ... and asks the workers for their INFO
        wanted = {sync["execution_id"], started["execution_id"]}
        for _ in range(200):  # lists are the projection's view, a moment behind the status
            listed = await _request(client, "list_executions", {})
            if {e["execution_id"] for e in listed["executions"]} == wanted:
                break
            await asyncio.sleep(0.05)
        assert {e["execution_id"] for e in listed["executions"]} == wanted
        await client.flush()
        assert seen.count("completed") == 2 and "started" in seen
        assert "requested" not in seen  # it carries the request's context: only components see it
    finally:
        await client.close()
    assert secured.violations() == []


async def test_a_client_cannot_write_the_log_or_use_jetstream(secured, running):
    """Each denied publish is refused by the server (to the client and in its log) and reaches no
    subscriber; what the client may do still works on the same connection."""
    errors: list[str] = []
    client = await secured.client(errors=errors)
    admin = await secured.client("admin")
    witnessed = []

    async def witness(msg) -> None:
        witnessed.append(msg.subject)

    for subject in (f"{NAMES.prefix}.exec.>", f"{NAMES.prefix}.append.>", "$KV.>"):
        await admin.subscribe(subject, cb=witness)
    await admin.flush()
    forged = {"type": "completed", "execution_id": "x", "task_id": "demo", "function_name": "echo", "at": ""}
    denied = [
        f"{NAMES.prefix}.exec.demo.x.completed",
        f"{NAMES.prefix}.exec.demo.x.cancel_requested",
        f"{NAMES.prefix}.append.demo.x.completed",
        f"$KV.{NAMES.state_bucket}.exec.x",
        f"$KV.{NAMES.tasks_bucket}.demo",
        f"$JS.API.STREAM.PURGE.{NAMES.stream}",
        f"$JS.API.DIRECT.GET.{NAMES.stream}",
        f"$JS.API.CONSUMER.MSG.NEXT.{NAMES.stream}.worker-demo",
        NAMES.api("register_task"),
        NAMES.api("delete_task"),
    ]
    try:
        for subject in denied:
            await client.publish(subject, json.dumps(forged).encode())
        with pytest.raises(nats.errors.TimeoutError):  # a JetStream request is dropped, never answered
            await client.request("$JS.API.INFO", b"", timeout=0.5)
        await client.subscribe("_SPEAR_INBOX.>")  # the components' replies stay theirs
        await client.flush()
        for _ in range(200):
            if len(errors) >= len(denied) + 2:
                break
            await asyncio.sleep(0.01)
        said = "\n".join(errors).lower()
        logged = "\n".join(secured.violations())
        for subject in [*denied, "$JS.API.INFO"]:
            assert f'permissions violation for publish to "{subject.lower()}"' in said, subject
            assert f'"$G/user:client" - Publish Violation - Subject "{subject}"' in logged, subject
        assert 'permissions violation for subscription to "_spear_inbox.>"' in said
        await admin.flush()
        assert witnessed == []
        reply = await _request(client, "invoke_function", invoke_body("echo", value=1))
        assert reply["result"]["result"] == 1
    finally:
        await client.close()
        await admin.close()


async def test_the_projection_role_expires_executions_and_rebuilds(secured):
    """Retention purges an ended execution's events; `--rebuild` drops the consumer and the views."""
    client = await secured.client()
    try:
        async with AsyncExitStack() as stack:
            await start_roles(stack, secured, async_execution={"status_retention_hours": 0.0003})  # ~1 s
            ended = await _request(client, "invoke_function", invoke_body("echo", value=1))
            for _ in range(300):
                status = await _request(client, "get_execution_status", {"execution_id": ended["execution_id"]})
                if not status["found"]:
                    break
                await asyncio.sleep(0.02)
            assert "expired" in status["message"], status
        projection_nc = await connect(secured.settings("projection"), "spear-projection")
        try:
            await rebuild(projection_nc, secured.settings("projection"))
        finally:
            await projection_nc.close()
    finally:
        await client.close()
    assert secured.violations() == []


async def test_a_reply_subject_cannot_make_a_component_publish_on_the_log(secured, running):
    """A client naming a subject components may write as its reply subject: the log's, the
    registry's, a bucket's (a probe: a forged `requested` was stored, an execution id squatted,
    a junk registry event logged four errors a second). Nothing is answered there, by the
    gateway's endpoints, by nats.micro's $SRV handlers, or by the workers' and projection's."""
    client = await secured.client()
    admin = await secured.client("admin")
    witnessed = []

    async def witness(msg) -> None:
        witnessed.append(msg.subject)

    for watched in (f"{NAMES.prefix}.exec.>", f"{NAMES.prefix}.tasks.>", f"$KV.{NAMES.state_bucket}.>"):
        await admin.subscribe(watched, cb=witness)
    await admin.flush()
    js = admin.jetstream()
    before = (await js.stream_info(NAMES.stream)).state.last_seq
    try:
        targets = [
            f"{NAMES.prefix}.exec.demo.victim.completed",
            f"{NAMES.prefix}.append.demo.forged-1.requested",
            f"{NAMES.prefix}.append_task.evil.registered",
            f"$KV.{NAMES.state_bucket}.forged",
        ]
        for target in targets:
            await client.publish(NAMES.api("get_health"), b"{}", reply=target)
            await client.publish(NAMES.api("get_execution_status"), b'{"execution_id": "x"}', reply=target)
            await client.publish("$SRV.PING", b"", reply=target)
            await client.publish(f"$SRV.INFO.{NAMES.service_name}", b"", reply=target)
        await client.flush()
        await asyncio.sleep(0.5)  # time for any answer to land
        await admin.flush()
        assert witnessed == []
        assert (await js.stream_info(NAMES.stream)).state.last_seq == before
        status = await _request(client, "get_execution_status", {"execution_id": "forged-1"})
        assert status["found"] is False, status
        reply = await _request(
            client, "invoke_function", {**invoke_body("echo", "ASYNC", value=1), "execution_id": "forged-1"}
        )
        assert reply["success"], reply  # the id is not squatted
    finally:
        await client.close()
        await admin.close()


@pytest.mark.slow
async def test_spear_up_secure_connects_each_part_with_its_role(tmp_path):
    """`spear up --secure`: generated passwords, each part as its own user, a printed client URL
    that works (also for `spear invoke`), and no way in without credentials."""
    from tests.test_registry import process_spec, write_script

    roots = tmp_path / "artifacts"
    roots.mkdir()
    write_script(roots / "echo.sh")
    registration = {"SPEAR_TASKS__ALLOW_REGISTRATION": "true", "SPEAR_TASKS__ARTIFACT_ROOTS": str(roots)}
    process = await spawn(
        *("up", "--secure", "--nats-port", "-1", "--http-port", str(free_port()), "--data-dir", str(tmp_path)),
        log_path=tmp_path / "up.log",
        env=registration,
    )
    try:
        url = await wait_ready(process)
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        shown_url = re.search(r"connect as user client: (\S+)", line).group(1)
        credentials = tmp_path / "nats" / "credentials.json"
        assert str(credentials) in line and credentials.stat().st_mode & 0o777 == 0o600
        # the password is in the file, not on a stdout that is no terminal (probe54: the journal kept it)
        password = json.loads(credentials.read_text())["client"]
        assert password not in line and "client:<password>@" in shown_url, line
        client_url = shown_url.replace("<password>", password)
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2)
        client = await nats.connect(client_url)
        try:
            assert (await _request(client, "invoke_function", invoke_body("echo", value=5)))["result"]["result"] == 5
            health = await _request(client, "get_health", {})
            assert health["status"] == "healthy", health
            # The client role may not register a task, by invoking either (probe19: NEW_TASK did)
            registering = {
                **invoke_body("run"),
                "task_id": "mine",
                "invocation_type": "NEW_TASK",
                "artifact_spec": process_spec("echo.sh"),
            }
            for body in (
                registering,
                {**registering, "invocation_type": "EXISTING_TASK", "create_if_not_exists": True},
            ):
                refused = await _request(client, "invoke_function", body)
                assert refused["error_code"] == "PERMISSION_DENIED" and "nats_invoke_registers" in refused["message"], (
                    refused
                )
            assert (await _request(client, "get_task", {"task_id": "mine"}))["found"] is False
        finally:
            await client.close()
        invoked = await spawn("invoke", "demo", "echo", "value=6", "--nats-url", client_url)
        out, _ = await asyncio.wait_for(invoked.communicate(), 30)
        assert invoked.returncode == 0 and json.loads(out) == 6
        violations = re.findall(r".*Violation.*", (tmp_path / "nats" / "nats-server.log").read_text())
        assert violations == []
    finally:
        assert await stop(process) == 0


async def test_registered_tasks_work_with_the_roles(secured, tmp_path):
    """Registering (as admin: the client role may not), a worker picking the task up, invoking it,
    get_task asking the workers, and a forced delete that cleans up: no component lacks a grant."""
    from tests.test_registry import process_spec, write_script

    roots = tmp_path / "artifacts"
    roots.mkdir()
    write_script(roots / "echo.sh")
    # as `spear up --secure` has it: invoking registers no task over NATS
    tasks = {"allow_registration": True, "artifact_roots": [str(roots)], "nats_invoke_registers": False}
    async with AsyncExitStack() as stack:
        await start_roles(stack, secured, tasks=tasks)
        admin = await secured.client("admin")
        client = await secured.client()
        try:
            registered = await _request(
                admin, "register_task", {"task_id": "echo", "artifact_spec": process_spec("echo.sh")}
            )
            assert registered["success"], registered
            body = {"task_id": "echo", "function_name": "run", "parameters": [{"name": "a", "value": 1}]}
            for _ in range(100):  # the worker picks the task up from the registry's events
                reply = await _request(client, "invoke_function", body)
                if reply.get("result"):
                    break
                await asyncio.sleep(0.05)
            assert reply["result"]["result"] == {"a": 1}, reply
            # NEW_TASK naming the task registered with the same artifact invokes it; another is refused
            same = {**body, "invocation_type": "NEW_TASK", "artifact_spec": process_spec("echo.sh")}
            assert (await _request(client, "invoke_function", same))["result"]["result"] == {"a": 1}
            other = {**same, "task_id": "echo2"}
            refused = await _request(client, "invoke_function", other)
            assert refused["error_code"] == "PERMISSION_DENIED", refused
            assert (await _request(client, "get_task", {"task_id": "echo2"}))["found"] is False
            task = await _request(client, "get_task", {"task_id": "echo"})
            assert len(task["task"]["workers"]) == 1 and len(task["task"]["instances"]) == 1, task
            deleted = await _request(
                admin, "delete_task", {"task_id": "echo", "force": True, "cleanup_executions": True}
            )
            assert deleted["success"] and deleted["cleaned_executions"] == 2, deleted
        finally:
            await admin.close()
            await client.close()
    assert secured.violations() == []


async def test_the_client_role_follows_executions_through_the_gateway(secured, running):
    """The least-privilege client may not read the stream (a `requested` event holds the context's
    secrets), so the SDK reads events through `P.api.get_execution_events`: redacted."""
    from spear.client import Client, ExecutionHandle

    client = Client(secured.url, user="client", password=secured.passwords["client"], prefix=NAMES.prefix)
    async with client:
        body = invoke_body("generate_text", "ASYNC", prompt="a b c", tokens=3)
        body["context"] = {"headers": {"Authorization": "Bearer secret"}}
        reply = await client.request("stream_function", body)
        handle = ExecutionHandle(client, reply["execution_id"], reply)
        assert isinstance(await handle.result(timeout=20), str)
        events = [event async for event in handle.events()]
        assert events[0].type == "requested" and events[-1].type == "completed"
        assert [e.seq for e in events] == sorted({e.seq for e in events})  # in order, each once
        assert "Bearer secret" not in json.dumps(events[0].data)  # redacted by the service layer
        assert events[0].data["context"]["headers"]["Authorization"] != "Bearer secret"
        late = [chunk.data async for chunk in handle.chunks()]  # a late joiner replays the chunks
        assert len(late) == 3
        streamed = [item async for item in client.stream("demo", "generate_text", prompt="x y", tokens=2)]
        assert len(streamed) == 2
    assert not [v for v in secured.violations() if "DIRECT.GET" in v]


async def test_a_denied_stream_read_says_permission_denied(secured, running):
    """A read the role may not make is dropped by the server: it says so, not "did not answer"."""
    from spear.core.eventstore import StoreUnavailable
    from spear.jetstream.store import JetStreamStore

    client = await secured.client()
    try:
        store = JetStreamStore(client, NAMES, 0.5)
        for read in (store.history, store.last):
            with pytest.raises(StoreUnavailable, match=r"permission denied.*DIRECT\.GET"):
                await read("x")
    finally:
        await client.close()


async def test_a_request_the_role_may_not_make_is_refused_at_once_by_the_sdk(secured, running):
    """The server drops a publish the user may not make and says so only asynchronously: the
    SDK waited its whole timeout and said DEADLINE_EXCEEDED (a probe: register_task as a client
    under --secure, 10 s). It says PERMISSION_DENIED as soon as the refusal comes."""
    import time

    from spear import errors
    from spear.client import Client

    client = Client(secured.url, user="client", password=secured.passwords["client"], prefix=NAMES.prefix)
    async with client:
        began = time.monotonic()
        with pytest.raises(errors.PermissionDenied, match=r"may not publish to .*register_task"):
            await client.request("register_task", {"task_id": "x", "artifact_spec": {}}, timeout=10)
        assert time.monotonic() - began < 2
        assert (await client.request("get_health", {}))["status"]  # what it may do still works


async def test_handing_on_works_with_the_worker_role(secured):
    """review25: an old worker asks on P.worker.functions and the new one answers on its inbox
    under the least-privilege roles; calls of the new function complete, with no violation."""
    async with AsyncExitStack() as stack:
        gateway_nc = await connect(secured.settings("gateway"), "spear-gateway")
        stack.push_async_callback(gateway_nc.close)
        service = await components.start_service(stack, gateway_nc, secured.settings("gateway"))
        await components.start_gateway(stack, service)
        projection_nc = await connect(secured.settings("projection"), "spear-projection")
        stack.push_async_callback(projection_nc.close)
        await components.start_projection(stack, projection_nc, secured.settings("projection"))
        workers = []
        for task, worker_id in ((old, "old-worker"), (new, "new-worker")):
            nc = await connect(secured.settings("worker"), worker_id)
            stack.push_async_callback(nc.close)
            worker = Worker(nc, secured.settings("worker"), [task], worker_id=worker_id)
            await worker.start()
            stack.push_async_callback(worker.stop)
            workers.append(worker)

        async def functions() -> set[str]:
            task = service.tasks.get("roll")
            return {f.name for f in task.functions} if task else set()

        await poll_until(functions, lambda names: "f2" in names, timeout_s=10)
        client = await secured.client()
        stack.push_async_callback(client.close)
        for i in range(12):
            body = {
                "task_id": "roll",
                "function_name": "f2",
                "execution_mode": "SYNC",
                "parameters": [{"name": "x", "value": i}],
            }
            reply = await _request(client, "invoke_function", body)
            assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED", reply
        assert workers[0].handed_on > 0
    assert secured.violations() == []
