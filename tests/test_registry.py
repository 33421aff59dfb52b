"""Tasks registered at runtime (CONTRACT §8) with real parts: the registry as stored events,
process artifacts (a shell script) in every mode, checksums, artifact roots, NEW_TASK, hot pickup
by a running worker, delete with and without force, paging, instances, and the registry rebuilt
after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from spear import artifacts
from spear.aio import poll_until
from spear.cli import components
from spear.core.config import with_overrides
from spear.core.eventstore import AppendConflict
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream import directget
from tests.conftest import Spear, call_body, has_status, invoke_body, start_spear
from tests.test_streaming import chunks_of, until_terminal

SCRIPT = """#!/bin/sh
# A process artifact: $1 is the function, the parameters are one JSON object on stdin.
input=$(cat)
case "$1" in
  run) echo "$input" ;;
  fail) echo "first line" >&2; echo "bad thing happened" >&2; exit 3 ;;
  words) echo '"a"'; echo 'b c'; echo 42; echo; echo NaN ;;
  sleep) echo "going to sleep" >&2; sleep 30; echo null ;;
esac
"""


def write_script(path: Path, text: str = SCRIPT) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return hashlib.sha256(text.encode()).hexdigest()


def process_spec(location: str, checksum: str = "", **metadata: str) -> dict:
    return {"artifact_type": "process", "location": location, "checksum": checksum, "metadata": metadata}


@pytest.fixture
def roots(tmp_path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    return root


@pytest.fixture
def open_settings(settings, roots):
    return with_overrides(
        settings,
        tasks={"allow_registration": True, "artifact_roots": [str(roots)], "instance_idle_s": 300.0},
        retry={"initial_backoff_ms": 20, "jitter": 0.0},
    )


@pytest_asyncio.fixture
async def registry(open_settings):
    async with AsyncExitStack() as stack:
        yield await start_spear(stack, open_settings)


async def register(running: Spear, client, task_id: str, spec: dict) -> dict:
    reply, _ = await running.call(client, "register_task", {"task_id": task_id, "artifact_spec": spec})
    return reply


async def registry_events(running: Spear, task_id: str = "*") -> list[str]:
    """The kinds of the registry events stored for a task, in order."""
    found = []
    stream, subjects = running.names.registry_stream, running.names.task_events(task_id)
    async for msg in directget.read_all(running.nc, stream, subjects, 0, 5.0):
        found.append(msg.headers["Nats-Subject"].rsplit(".", 1)[-1])
    return found


# --- off by default, roots, checksums ------------------------------------------------------------


async def test_registration_is_refused_by_default_and_nothing_is_written(spear, client, tmp_path):
    checksum = write_script(tmp_path / "echo.sh")
    reply, headers = await spear.call(
        client, "register_task", {"artifact_spec": process_spec(str(tmp_path / "echo.sh"))}
    )
    assert reply["error_code"] == "PERMISSION_DENIED" and "allow_registration" in reply["message"]
    assert headers["Nats-Service-Error-Code"] == "403"
    body = {
        **call_body("run", task_id="mine"),
        "invocation_type": "NEW_TASK",
        "artifact_spec": process_spec(str(tmp_path / "echo.sh"), checksum),
    }
    reply, _ = await spear.call(client, "invoke_function", body)
    assert reply["error_code"] == "PERMISSION_DENIED"
    assert await registry_events(spear) == []
    reply, _ = await spear.call(client, "get_task", {"task_id": "mine"})
    assert reply["found"] is False


async def test_paths_outside_the_roots_are_refused_naming_the_path(registry, client, roots, tmp_path):
    write_script(tmp_path / "outside.sh")
    (roots / "sub").mkdir()
    (roots / "link.sh").symlink_to(tmp_path / "outside.sh")
    for location in (str(tmp_path / "outside.sh"), "sub/../../outside.sh", str(roots / "link.sh")):
        reply = await register(registry, client, "escape", process_spec(location))
        assert reply["error_code"] == "PERMISSION_DENIED", location
        assert str(tmp_path / "outside.sh") in reply["message"], reply["message"]  # the path it resolves to
    assert await registry_events(registry) == []


async def test_a_wrong_checksum_is_refused_and_a_changed_file_fails_the_call(registry, client, roots):
    checksum = write_script(roots / "echo.sh")
    reply = await register(registry, client, "echo", process_spec("echo.sh", "sha256:" + "0" * 64))
    assert reply["error_code"] == "INVALID_ARGUMENT" and "checksum" in reply["message"]
    assert await registry_events(registry) == []  # nothing stored
    reply = await register(registry, client, "echo", process_spec("echo.sh", "not-hex"))
    assert reply["error_code"] == "INVALID_ARGUMENT"

    reply = await register(registry, client, "echo", process_spec("echo.sh", checksum))  # bare hex
    assert reply["success"] and reply["task"]["artifact_spec"]["checksum"] == f"sha256:{checksum}"
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="echo", x=1))
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED"
    write_script(roots / "echo.sh", SCRIPT.replace("exit 3", "exit 4"))  # changed after registration
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="echo", x=1))
    result = reply["result"]
    assert result["status"] == "EXECUTION_STATUS_FAILED"
    assert result["error_code"] == "ARTIFACT_CHECKSUM_MISMATCH" and "changed" in result["error_message"]


async def test_a_file_changed_between_the_check_and_the_start_never_runs(registry, client, roots, monkeypatch):
    """probe57: the check hashed the file, the call then ran it by path: a file renamed over the
    artifact in between ran (48 of 200 calls, COMPLETED). What runs is the checked bytes' sealed
    copy; here the change comes just after the check (the check is made to see the old bytes)."""
    good = "#!/bin/sh\necho '\"good\"'\n"
    checksum = write_script(roots / "swap.sh", good)
    assert (await register(registry, client, "swap", process_spec("swap.sh", checksum)))["success"]
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="swap"))
    assert reply["result"]["result"] == "good", reply
    write_script(roots / "swap.sh", "#!/bin/sh\necho '\"EVIL CODE RAN\"'\n")
    monkeypatch.setattr(artifacts, "file_sha256", lambda path: checksum)  # (the check saw the old bytes)
    for mode in ("SYNC", "ASYNC"):
        reply, _ = await registry.call(client, "invoke_function", call_body("run", mode, task_id="swap"))
        done, _ = await registry.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_COMPLETED"))
        assert done["result"]["result"] == "good", done


async def test_stdout_past_what_a_result_carries_ends_the_call_and_deep_json_is_not_retried(
    registry, client, roots, monkeypatch
):
    """probe57: a process artifact's stdout was kept whole: 300 MB of output grew the worker to
    988 MB before the result was refused (an endless writer, until its time limit or the OOM
    killer). And stdout nested past the stack was a RecursionError, retried."""
    from spear.worker.context import StreamedItems

    monkeypatch.setattr(StreamedItems, "limit", 100_000)
    checksum = write_script(roots / "endless.sh", "#!/bin/sh\nyes 0123456789\n")
    assert (await register(registry, client, "endless", process_spec("endless.sh", checksum)))["success"]
    began = time.monotonic()
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="endless"))
    result = reply["result"]
    assert result["status"] == "EXECUTION_STATUS_FAILED" and result["attempt"] == 1, result  # (not retried)
    assert result["error_message"].startswith("ResultTooLarge: stdout passed 200000 bytes"), result
    assert time.monotonic() - began < 10

    deep = '#!/bin/sh\npython3 -c \'print("[" * 50000 + "]" * 50000)\'\n'
    checksum = write_script(roots / "deep.sh", deep)
    assert (await register(registry, client, "deep", process_spec("deep.sh", checksum)))["success"]
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="deep"))
    result = reply["result"]
    assert result["status"] == "EXECUTION_STATUS_FAILED" and result["attempt"] == 1, result
    assert result["error_message"].startswith("stdout is not one JSON value"), result


async def test_a_python_script_artifact_imports_its_neighbours_as_run_by_its_path(registry, client, roots):
    """review59: run as its sealed copy, a script's `sys.path[0]` was /proc/self/fd, and its
    `import helper` of a file beside it failed."""
    (roots / "helper.py").write_text("ANSWER = 42\n")
    script = f"#!{sys.executable}\nimport json, helper\nprint(json.dumps(helper.ANSWER))\n"
    checksum = write_script(roots / "uses_helper.py", script)
    assert (await register(registry, client, "neighbours", process_spec("uses_helper.py", checksum)))["success"]
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="neighbours"))
    assert reply["result"]["result"] == 42, reply


async def test_a_programs_environment_holds_not_the_workers_spear_settings(registry, client, roots, monkeypatch):
    """probe57: a process artifact inherited the worker's environment, its NATS password with it;
    a wrapper that wrote its environment to stderr stored it in log events any client may read."""
    monkeypatch.setenv("SPEAR_NATS__PASSWORD", "the-workers-secret")
    monkeypatch.setenv("SPEAR_API__TOKENS", "another-secret")
    monkeypatch.setenv("MY_APP_SETTING", "kept")
    script = "#!/bin/sh\nenv >&2\nenv | grep -c the-workers-secret || true\n"
    checksum = write_script(roots / "envdump.sh", script)
    assert (await register(registry, client, "envdump", process_spec("envdump.sh", checksum)))["success"]
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="envdump"))
    assert reply["result"]["result"] == 0, reply  # (grep -c counts no line with the secret)
    status, _ = await registry.call(
        client, "get_execution_status", {"execution_id": reply["execution_id"], "include_logs": True}
    )
    logged = json.dumps(status["logs"])
    assert "MY_APP_SETTING=kept" in logged and f"SPEAR_ARTIFACT_PATH={roots / 'envdump.sh'}" in logged, logged
    assert "secret" not in logged and "SPEAR_NATS__" not in logged and "SPEAR_API__" not in logged, logged
    assert f"SPEAR_EXECUTION_ID={reply['execution_id']}" in logged


async def test_unusable_specs_are_invalid_argument_never_a_crash(registry, client, roots):
    write_script(roots / "echo.sh")
    (roots / "loop").symlink_to(roots / "loop")
    (roots / "plain.txt").write_text("not executable")
    (roots / "noisy.py").write_text("import spear\nprint('hello from import')\nt = spear.Task('t')\n")
    cases = [
        process_spec("a\u0000b"),
        process_spec("x" * 4000),
        process_spec("loop"),
        process_spec("plain.txt"),
        process_spec("missing.sh"),
        process_spec("echo.sh", functions="bad.name"),
        process_spec("echo.sh", functions=" , "),
        process_spec("echo.sh", functions=" add , mul ,,add"),  # a name twice (a probe: listed twice)
        {"artifact_type": "java", "location": "echo.sh"},
        {"artifact_type": "python", "location": "noisy.py"},
        {"artifact_type": "python", "location": "noisy.py:missing"},
    ]
    for spec in cases:
        reply = await register(registry, client, "bad", spec)
        assert reply["error_code"] == "INVALID_ARGUMENT", (spec, reply)
    reply = await register(registry, client, "bad", {"artifact_type": "java", "location": "echo.sh"})
    said = "artifact_spec.artifact_type: 'java' is not one of the values it takes: 'process', 'python'"
    assert reply["message"] == said, reply  # (probe56: the values were not named)
    reply = await register(registry, client, "bad", {"artifact_type": "python", "location": "noisy.py:missing"})
    assert "noisy.py has no 'missing'" in reply["message"] and "spear_artifact" not in reply["message"], reply
    reply = await register(registry, client, "noisy", {"artifact_type": "python", "location": "noisy.py:t"})
    assert reply["success"] and reply["task"]["functions"] == [], reply  # printing while imported is fine
    assert await registry_events(registry) == ["registered"]


# --- a process artifact in every mode ----------------------------------------------------------------


async def test_a_shell_script_registered_with_its_checksum_runs_sync_async_and_stream(registry, client, roots):
    checksum = write_script(roots / "tool.sh")
    spec = process_spec("tool.sh", f"sha256:{checksum}", functions="run,fail,words,sleep")
    reply = await register(registry, client, "tool", spec)
    assert reply["success"] and reply["task_id"] == "tool"
    assert sorted(f["name"] for f in reply["task"]["functions"]) == ["fail", "run", "sleep", "words"]

    body = call_body("run", task_id="tool", a=1, b=[2, "x"])
    body["parameters"].append({"name": "user-id", "value": 3})  # any name: JSON keys (probe50)
    reply, _ = await registry.call(client, "invoke_function", body)
    assert reply["result"]["result"] == {"a": 1, "b": [2, "x"], "user-id": 3}  # stdin came back as the result
    assert reply["task_id"] == "tool" and reply["instance_id"]

    reply, _ = await registry.call(client, "invoke_function", call_body("run", "ASYNC", task_id="tool", n=5))
    assert reply["result"]["status"] == "EXECUTION_STATUS_PENDING"
    done, _ = await registry.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_COMPLETED"))
    assert done["result"]["result"] == {"n": 5}

    reply, _ = await registry.call(client, "stream_function", call_body("words", task_id="tool"))
    events = await until_terminal(registry, reply["execution_id"])
    # JSON where a line parses (NaN is no JSON: probe19 saw it fail the call, not stay a string);
    # every line is a chunk, an empty one too (probe50: it was left out)
    assert [c.data for c in chunks_of(events)] == ["a", "b c", 42, "", "NaN"]
    assert events[-1].kind == "completed" and events[-1].result.result == ["a", "b c", 42, "", "NaN"]
    from spear.client import Client

    async with Client(registry.settings.nats.urls, prefix=registry.names.prefix) as sdk:
        assert [item async for item in sdk.stream("tool", "words")] == ["a", "b c", 42, "", "NaN"]  # once, not twice
        assert await sdk.yields_items("tool", "run")  # a process artifact streams its stdout lines

    body = {**call_body("fail", task_id="tool"), "context": {"max_retries": 0}}
    reply, _ = await registry.call(client, "invoke_function", body)
    result = reply["result"]
    assert result["status"] == "EXECUTION_STATUS_FAILED" and result["error_code"] == "FUNCTION_ERROR"
    assert result["error_message"] == "first line\nbad thing happened"  # the tail of stderr
    status, _ = await registry.call(
        client, "get_execution_status", {"execution_id": reply["execution_id"], "include_logs": True}
    )
    assert [line.split("] ", 1)[1] for line in status["logs"]] == ["first line", "bad thing happened"]

    reply, _ = await registry.call(client, "invoke_function", call_body("nope", task_id="tool"))
    assert reply["error_code"] == "NOT_FOUND"


async def test_a_call_ends_when_its_process_exits_and_what_still_holds_its_output_is_killed(
    registry, client, roots, tmp_path
):
    """probe19: a script that started a daemon in a session of its own (out of the group kill)
    holding its stdout, then exited 0, ended TIMEOUT at its time limit, the daemon left alive."""
    pid_file = tmp_path / "daemon.pid"
    write_script(roots / "daemon.sh", f"#!/bin/sh\nsetsid sh -c 'echo $$ > {pid_file}; exec sleep 777' &\necho 1\n")
    await register(registry, client, "daemon", process_spec("daemon.sh", functions="run"))
    began = time.monotonic()
    body = {**call_body("run", task_id="daemon"), "context": {"timeout_ms": 20_000, "max_retries": 0}}
    reply, _ = await registry.call(client, "invoke_function", body)
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and reply["result"]["result"] == 1, reply
    assert time.monotonic() - began < 5
    await _until(pid_file.exists, "the daemon to say its pid")
    await _until(lambda: not _alive(int(pid_file.read_text())), "the daemon to be killed")
    # and when the call is cut short (its time limit here), as the process group is (review15)
    pid_file.unlink()
    write_script(roots / "daemon.sh", f"#!/bin/sh\nsetsid sh -c 'echo $$ > {pid_file}; exec sleep 777' &\nsleep 30\n")
    await register(registry, client, "daemon2", process_spec("daemon.sh", functions="run"))
    body = {**call_body("run", task_id="daemon2"), "context": {"timeout_ms": 1000, "max_retries": 0}}
    reply, _ = await registry.call(client, "invoke_function", body)
    assert reply["result"]["status"] == "EXECUTION_STATUS_TIMEOUT", reply
    await _until(pid_file.exists, "the daemon to say its pid")
    await _until(lambda: not _alive(int(pid_file.read_text())), "the daemon of a call cut short to be killed")


async def test_a_stream_written_faster_than_it_is_stored_is_stored_whole(registry, client, roots):
    """The process exits long before its lines are stored: they are read to the end (review15: a
    call cut short after its exit stored 13,000 of 60,000 lines and called it COMPLETED)."""
    write_script(roots / "lines.sh", "#!/bin/sh\nseq 1 30000\n")
    await register(registry, client, "lines", process_spec("lines.sh", functions="count"))
    body = {**call_body("count", task_id="lines"), "context": {"timeout_ms": 60_000}}
    reply, _ = await registry.call(client, "stream_function", body)
    events = await until_terminal(registry, reply["execution_id"], timeout=60)
    assert events[-1].kind == "completed", events[-1]
    assert [c.data for c in chunks_of(events)] == list(range(1, 30001))


async def test_timeout_kills_the_process_group(registry, client, roots, tmp_path):
    pids = write_sleeper(roots, tmp_path)
    await register(registry, client, "tool", process_spec("tool.sh", functions="sleep"))
    # The time limit leaves the script (a shell started in milliseconds) time to write its pids.
    body = {**call_body("sleep", task_id="tool"), "context": {"timeout_ms": 1000, "max_retries": 0}}
    reply, _ = await registry.call(client, "invoke_function", body)
    assert reply["result"]["status"] == "EXECUTION_STATUS_TIMEOUT"
    assert pids.exists(), "the script did not get to start its child within the time limit"
    await _until_ended(pids, "the script and its `sleep 30` to be killed")


def write_sleeper(roots: Path, tmp_path: Path) -> Path:
    """`tool.sh`, a script that starts `sleep 30` and waits for it; once both run, the file it
    returns holds their pids. Only those are watched: other tests' processes are not ours."""
    pids = tmp_path / "pids"
    write_script(
        roots / "tool.sh",
        f"#!/bin/sh\ncat >/dev/null\necho $$ > {pids}.part\nsleep 30 &\necho $! >> {pids}.part\n"
        f"mv {pids}.part {pids}\nwait\necho null\n",
    )
    return pids


async def _until_ended(pids: Path, what: str) -> None:
    started = _read_pids(pids)
    assert len(started) == 2, started
    await _until(lambda: not [pid for pid in started if _alive(pid)], what)


def _read_pids(pids: Path) -> list[int]:
    return [int(pid) for pid in pids.read_text().split()]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: it only waits for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _until(condition, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.02)


# --- NEW_TASK, hot pickup, instances -------------------------------------------------------------


async def test_new_task_twice_with_the_same_artifact_registers_once(registry, client, roots):
    checksum = write_script(roots / "echo.sh")
    body = {
        **call_body("run", task_id="fresh", v=1),
        "invocation_type": "NEW_TASK",
        "task_name": "fresh one",
        "task_description": "made by NEW_TASK",
        "artifact_spec": process_spec("echo.sh", checksum),
    }
    first, _ = await registry.call(client, "invoke_function", body)
    second, _ = await registry.call(client, "invoke_function", body)
    for reply in (first, second):
        assert reply["success"] and reply["task_id"] == "fresh" and reply["result"]["result"] == {"v": 1}
    assert await registry_events(registry, "fresh") == ["registered"]
    task, _ = await registry.call(client, "get_task", {"task_id": "fresh"})
    assert task["task"]["task_name"] == "fresh one" and task["task"]["description"] == "made by NEW_TASK"

    write_script(roots / "other.sh")
    other = {**body, "artifact_spec": process_spec("other.sh")}
    reply, _ = await registry.call(client, "invoke_function", other)
    assert reply["error_code"] == "ALREADY_EXISTS"
    more = {**body, "artifact_spec": process_spec("echo.sh", checksum, functions="run,more")}
    reply, _ = await registry.call(client, "invoke_function", more)  # other functions: another artifact
    assert reply["error_code"] == "ALREADY_EXISTS", reply
    versioned = {**body, "artifact_spec": {**process_spec("echo.sh", checksum), "version": "2"}}
    reply, _ = await registry.call(client, "invoke_function", versioned)  # another version (a probe: taken silently)
    assert reply["error_code"] == "ALREADY_EXISTS", reply
    assert "artifact_id" not in task["task"]["artifact_spec"]  # not given: not stored (older workers refuse it)
    labelled = {**body, "artifact_spec": {**process_spec("echo.sh", checksum), "artifact_id": "a-7"}}
    reply, _ = await registry.call(client, "invoke_function", labelled)  # SPEAR's field (review14: refused)
    assert reply["error_code"] == "ALREADY_EXISTS", reply  # another label: another artifact, as a version is
    reply, _ = await registry.call(client, "invoke_function", {**labelled, "task_id": "labelled"})
    assert reply["success"], reply
    task, _ = await registry.call(client, "get_task", {"task_id": "labelled"})
    assert task["task"]["artifact_spec"]["artifact_id"] == "a-7", task

    missing = {**call_body("run", task_id="lazy", w=2), "create_if_not_exists": True}
    reply, _ = await registry.call(client, "invoke_function", missing)  # (probe29: "a NEW_TASK invocation needs")
    assert reply["error_code"] == "NOT_FOUND" and "create_if_not_exists has no artifact_spec" in reply["message"]
    missing["artifact_spec"] = process_spec("echo.sh")
    reply, _ = await registry.call(client, "invoke_function", missing)
    assert reply["task_id"] == "lazy" and reply["result"]["result"] == {"w": 2}
    assert await registry_events(registry, "lazy") == ["registered"]

    # a call its new task could not serve is refused before anything is stored (a probe: it
    # was refused NOT_FOUND, and the task registered all the same)
    unserved = {**body, **call_body("zzz", task_id="nt3"), "invocation_type": "NEW_TASK"}
    reply, _ = await registry.call(client, "invoke_function", unserved)
    assert reply["error_code"] == "NOT_FOUND" and "no function 'zzz'" in reply["message"], reply
    assert await registry_events(registry, "nt3") == []
    task, _ = await registry.call(client, "get_task", {"task_id": "nt3"})
    assert task["found"] is False, task


async def test_without_a_task_id_the_same_artifact_gets_the_same_id_and_other_functions_another(
    registry, client, roots
):
    checksum = write_script(roots / "echo.sh")
    ids = []
    for functions in ("run", "run", "run,more"):
        body = {"artifact_spec": process_spec("echo.sh", checksum, functions=functions)}
        reply, _ = await registry.call(client, "register_task", body)
        assert reply["success"], reply
        ids.append(reply["task_id"])
    assert ids[0] == ids[1] != ids[2] and all(i.startswith("task-") for i in ids)
    reply, _ = await registry.call(client, "register_task", {"artifact_spec": process_spec("echo.sh", checksum)})
    assert reply["success"] and reply["task_id"] not in ids  # no metadata: the id made before metadata counted


async def test_a_running_worker_picks_up_a_new_task_and_reuses_its_instance(registry, client, roots):
    worker = registry.worker
    assert worker is not None and "tool" not in worker.consumers
    write_script(roots / "tool.sh")
    await register(registry, client, "tool", process_spec("tool.sh"))
    await _until(lambda: "tool" in worker.consumers, "the worker to serve the new task")
    first, _ = await registry.call(client, "invoke_function", call_body("run", task_id="tool", i=1))
    again, _ = await registry.call(client, "invoke_function", call_body("run", task_id="tool", i=2))
    assert first["instance_id"] and first["instance_id"] == again["instance_id"]
    fresh, _ = await registry.call(
        client, "invoke_function", {**call_body("run", task_id="tool", i=3), "force_new_instance": True}
    )
    assert fresh["result"]["result"] == {"i": 3} and fresh["instance_id"] != first["instance_id"]
    await registry.caught_up()  # counts come from the projection
    task, _ = await registry.call(client, "get_task", {"task_id": "tool"})
    assert task["task"]["workers"] == [worker.worker_id]
    listed, _ = await registry.call(client, "list_workers", {"task_id": "tool"})
    assert [w["worker_id"] for w in listed["workers"]] == [worker.worker_id]
    assert "tool" in listed["workers"][0]["tasks"] and "demo" in listed["workers"][0]["tasks"]
    assert [i["instance_id"] for i in task["task"]["instances"]] == [fresh["instance_id"]]
    assert task["task"]["execution_count"] == 3 and task["task"]["last_status"] == "EXECUTION_STATUS_COMPLETED"
    assert task["task"]["registered"] is True
    assert task["task"]["created_at"] and task["task"]["updated_at"]


async def test_idle_instances_are_retired(open_settings, client, roots):
    settings = with_overrides(open_settings, tasks={"instance_idle_s": 0.3})
    write_script(roots / "tool.sh")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        await register(running, client, "tool", process_spec("tool.sh"))
        first, _ = await running.call(client, "invoke_function", call_body("run", task_id="tool", i=1))
        assert first["instance_id"]
        registered = running.worker.registered["tool"]
        await _until(lambda: registered.instance is None, "the idle instance to be retired")
        task, _ = await running.call(client, "get_task", {"task_id": "tool"})
        assert task["task"]["instances"] == []
        again, _ = await running.call(client, "invoke_function", call_body("run", task_id="tool", i=2))
        assert again["instance_id"] and again["instance_id"] != first["instance_id"]


LONG_LIVED = """#!/bin/sh
# A long-lived process artifact: started once with `serve`, one JSON line per call on stdin.
[ "$1" = serve ] || exit 2
n=0
while read -r line; do
  n=$((n+1))
  echo "call $n" >&2
  printf '{"chunk": %d}\\n' "$n"
  printf '{"result": {"calls": %d, "pid": %d}}\\n' "$n" "$$"
done
"""


async def test_a_long_lived_process_instance_serves_call_after_call(registry, client, roots):
    write_script(roots / "server.sh", LONG_LIVED)
    await register(registry, client, "server", process_spec("server.sh", long_lived="true"))
    first, _ = await registry.call(client, "invoke_function", call_body("run", task_id="server"))
    second, _ = await registry.call(client, "invoke_function", call_body("run", task_id="server"))
    assert first["result"]["result"]["calls"] == 1 and second["result"]["result"]["calls"] == 2
    assert first["result"]["result"]["pid"] == second["result"]["result"]["pid"]  # one process
    assert first["instance_id"] == second["instance_id"]
    reply, _ = await registry.call(client, "stream_function", call_body("run", task_id="server"))
    events = await until_terminal(registry, reply["execution_id"])
    assert [c.data for c in chunks_of(events)] == [3] and events[-1].result.result["calls"] == 3
    fresh, _ = await registry.call(
        client, "invoke_function", {**call_body("run", task_id="server"), "force_new_instance": True}
    )
    assert fresh["result"]["result"]["calls"] == 1 and fresh["instance_id"] != first["instance_id"]
    assert fresh["result"]["result"]["pid"] != first["result"]["result"]["pid"]


ANSWERS_ERRORS = """#!/bin/sh
# A long-lived process that answers `err` calls with an error, and `ok` calls with its pid.
[ "$1" = serve ] || exit 2
while read -r line; do
  case "$line" in
    *'"function": "err"'*) printf '{"error": "no such thing"}\\n' ;;
    *) printf '{"result": {"pid": %d}}\\n' "$$" ;;
  esac
done
"""


async def test_a_long_lived_process_that_answers_an_error_serves_on(registry, client, roots):
    """`{"error": …}` is the function failing, not the process: it was killed and a new one
    started at every such answer (a probe)."""
    write_script(roots / "answers.sh", ANSWERS_ERRORS)
    await register(registry, client, "answers", process_spec("answers.sh", long_lived="true", functions="ok,err"))
    first, _ = await registry.call(client, "invoke_function", call_body("ok", task_id="answers"))
    failed, _ = await registry.call(
        client, "invoke_function", {**call_body("err", task_id="answers"), "context": {"max_retries": 0}}
    )
    assert failed["result"]["error_message"] == "no such thing", failed
    again, _ = await registry.call(client, "invoke_function", call_body("ok", task_id="answers"))
    assert again["result"]["result"]["pid"] == first["result"]["result"]["pid"]
    assert again["instance_id"] == first["instance_id"]


async def test_a_long_lived_process_that_dies_at_start_says_why(registry, client, roots):
    """CONTRACT §8: the tail of stderr in error_message (it said only "not running")."""
    write_script(roots / "dies.sh", "#!/bin/sh\necho 'cannot start: no config' >&2\nexit 1\n")
    await register(registry, client, "dies", process_spec("dies.sh", long_lived="true"))
    reply, _ = await registry.call(
        client, "invoke_function", {**call_body("run", task_id="dies"), "context": {"max_retries": 0}}
    )
    message = reply["result"]["error_message"]
    assert "exited with code 1" in message and "cannot start: no config" in message, reply


async def test_a_python_artifact_names_a_spear_task(registry, client, roots):
    code = (
        "import spear\n"
        "shop = spear.Task('ignored', description='from a file')\n"
        "@shop.function\n"
        "def total(prices: list, tax: float = 0.0):\n"
        "    return sum(prices) * (1 + tax)\n"
    )
    (roots / "shop.py").write_text(code)
    reply = await register(registry, client, "shop", {"artifact_type": "python", "location": "shop.py:shop"})
    assert reply["success"], reply
    [function] = reply["task"]["functions"]
    assert function["name"] == "total" and [p["name"] for p in function["parameters"]] == ["prices", "tax"]
    reply, _ = await registry.call(client, "invoke_function", call_body("total", task_id="shop", prices=[1, 2]))
    assert reply["result"]["result"] == 3 and reply["instance_id"]
    reply, _ = await registry.call(client, "invoke_function", call_body("total", task_id="shop", nope=1))
    assert reply["error_code"] == "INVALID_ARGUMENT"  # parameters checked at the door
    reply = await register(registry, client, "bad", {"artifact_type": "python", "location": "shop.py:nothing"})
    assert reply["error_code"] == "INVALID_ARGUMENT" and "nothing" in reply["message"]


async def test_a_python_artifact_s_function_runs_in_a_child_process_too(registry, client, roots):
    """`isolation="process"`: the child loads the artifact from its file (its module's name, made
    up by the worker, imports from nowhere), with the root for the file's own imports."""
    (roots / "helperz.py").write_text("def twice(x):\n    return 2 * x\n")
    code = (
        "import os, spear, helperz\n"
        "iso = spear.Task('ignored')\n"
        "@iso.function(isolation='process')\n"
        "def where(x: int):\n"
        "    return {'pid': os.getpid(), 'twice': helperz.twice(x)}\n"
    )
    (roots / "iso.py").write_text(code)
    reply = await register(registry, client, "iso", {"artifact_type": "python", "location": "iso.py:iso"})
    assert reply["success"], reply
    reply, _ = await registry.call(client, "invoke_function", call_body("where", task_id="iso", x=21))
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED", reply
    assert reply["result"]["result"]["twice"] == 42 and reply["result"]["result"]["pid"] != os.getpid()


async def test_a_python_artifact_s_own_classes_reach_its_child_process_as_built_values(registry, client, roots):
    """review53: the worker built a parameter of the artifact's own class and pickled it to the
    child, which could not unpickle it before it had loaded the artifact: its reader thread died
    and the call waited for its time limit, every attempt. The child builds them itself now."""
    code = (
        "import dataclasses, enum, os, spear\n"
        "typed = spear.Task('ignored')\n"
        "class Speed(str, enum.Enum):\n"
        "    SLOW = 'slow'\n"
        "    FAST = 'fast'\n"
        "@dataclasses.dataclass\n"
        "class Line:\n"
        "    sku: str\n"
        "    qty: int = 1\n"
        "@typed.function(isolation='process', max_retries=0, timeout_ms=20000)\n"
        "def place(speed: Speed, lines: list[Line]):\n"
        "    kinds = sorted({type(line).__name__ for line in lines})\n"
        "    return {'speed': speed.name, 'qty': sum(line.qty for line in lines), 'kinds': kinds, 'pid': os.getpid()}\n"
    )
    (roots / "typed.py").write_text(code)
    reply = await register(registry, client, "typed", {"artifact_type": "python", "location": "typed.py:typed"})
    assert reply["success"], reply
    began = time.monotonic()
    body = call_body("place", task_id="typed", speed="fast", lines=[{"sku": "a", "qty": 2.0}, {"sku": "b"}])
    reply, _ = await registry.call(client, "invoke_function", body)
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED", reply
    result = reply["result"]["result"]
    assert {**result, "pid": 0} == {"speed": "FAST", "qty": 3, "kinds": ["Line"], "pid": 0}
    assert result["pid"] != os.getpid() and time.monotonic() - began < 10
    reply, _ = await registry.call(
        client, "invoke_function", call_body("place", task_id="typed", speed="warp", lines=[])
    )
    assert reply["result"]["error_code"] == "INVALID_ARGUMENT", reply
    # a typo'd field of a dataclass is refused there too, not taken as its default (probe56)
    body = call_body("place", task_id="typed", speed="fast", lines=[{"sku": "a", "qyt": 2}])
    reply, _ = await registry.call(client, "invoke_function", body)
    assert reply["result"]["error_code"] == "INVALID_ARGUMENT", reply
    assert reply["result"]["error_message"].endswith("lines[0]: unknown field 'qyt' (fields: sku, qty)"), reply


async def test_a_python_artifact_as_a_module_of_a_root(registry, client, roots):
    (roots / "pkgx").mkdir()
    (roots / "pkgx" / "__init__.py").write_text("")
    (roots / "pkgx" / "helper.py").write_text("def twice(x):\n    return 2 * x\n")
    (roots / "pkgx" / "mod.py").write_text(
        "import spear\nfrom pkgx.helper import twice\n"
        "task = spear.Task('mod')\n@task.function\ndef double(x: int) -> int:\n    return twice(x)\n"
    )
    spec = {"artifact_type": "python", "location": "pkgx.mod:task"}
    reply = await register(registry, client, "mod", spec)
    assert reply["success"], reply
    assert (
        reply["task"]["artifact_spec"]["checksum"]
        == "sha256:" + hashlib.sha256((roots / "pkgx" / "mod.py").read_bytes()).hexdigest()
    )
    first, _ = await registry.call(client, "invoke_function", call_body("double", task_id="mod", x=21))
    assert first["result"]["result"] == 42  # its own imports resolve from the root
    fresh, _ = await registry.call(
        client, "invoke_function", {**call_body("double", task_id="mod", x=1), "force_new_instance": True}
    )
    assert fresh["result"]["result"] == 2 and fresh["instance_id"] != first["instance_id"]
    reply = await register(registry, client, "nomod", {"artifact_type": "python", "location": "pkgx.absent:task"})
    assert reply["error_code"] == "INVALID_ARGUMENT" and "pkgx.absent" in reply["message"]


@pytest.mark.parametrize("location", ["pkgrel.sub.mod:task", "pkgrel/sub/mod.py:task"])
async def test_a_python_artifact_in_a_package_imports_relatively(registry, client, roots, location):
    """probe28: `from . import helper` in a package's module failed registration ("attempted
    relative import with no known parent package"), where plain Python with the root on sys.path
    imports it. In a thread and in a child process alike."""
    sub = roots / "pkgrel" / "sub"
    sub.mkdir(parents=True, exist_ok=True)
    (roots / "pkgrel" / "__init__.py").write_text("")
    (sub / "__init__.py").write_text("")
    (sub / "helper.py").write_text("def twice(x):\n    return 2 * x\n")
    (roots / "pkgrel" / "common.py").write_text("OFFSET = 100\n")
    (sub / "mod.py").write_text(
        "import spear\nfrom . import helper\nfrom ..common import OFFSET\n"
        "task = spear.Task('rel')\n"
        "@task.function\ndef double(x: int) -> int:\n    return helper.twice(x) + OFFSET\n"
        "@task.function(isolation='process')\ndef double_apart(x: int) -> int:\n    return helper.twice(x) + OFFSET\n"
    )
    task_id = "rel" + str(len(location))
    reply = await register(registry, client, task_id, {"artifact_type": "python", "location": location})
    assert reply["success"], reply
    for function in ("double", "double_apart"):
        called, _ = await registry.call(client, "invoke_function", call_body(function, task_id=task_id, x=21))
        assert called["result"]["result"] == 142, called


# --- delete --------------------------------------------------------------------------------------


async def test_delete_refuses_while_an_execution_runs_unless_forced(registry, client, roots):
    write_script(roots / "tool.sh")
    await register(registry, client, "tool", process_spec("tool.sh", functions="run,sleep"))
    done, _ = await registry.call(client, "invoke_function", call_body("run", task_id="tool", k=1))
    reply, _ = await registry.call(client, "invoke_function", call_body("sleep", "ASYNC", task_id="tool"))
    running = reply["execution_id"]
    await registry.status_until(client, running, has_status("EXECUTION_STATUS_RUNNING"))

    reply, headers = await registry.call(client, "delete_task", {"task_id": "tool"})
    assert reply["error_code"] == "FAILED_PRECONDITION" and headers["Nats-Service-Error-Code"] == "409"
    assert not reply.get("deleted"), reply  # proto3: absent is false
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="tool", k=2))
    assert reply["success"]  # still registered

    reply, _ = await registry.call(
        client, "delete_task", {"task_id": "tool", "force": True, "cleanup_executions": True}
    )
    assert reply["success"] and reply["cancelled_executions"] == 1 and reply["cleaned_executions"] == 3
    assert reply["deleted"] is True, reply  # SPEAR's DeleteTaskResponse.deleted (review14: missing)
    assert await registry_events(registry, "tool") == ["registered", "deleted"]
    reply, _ = await registry.call(client, "invoke_function", call_body("run", task_id="tool", k=3))
    assert reply["error_code"] == "NOT_FOUND"
    for execution_id in (running, done["execution_id"]):
        status, _ = await registry.call(client, "get_execution_status", {"execution_id": execution_id})
        assert status["found"] is False and "removed at" in status["message"], status
        assert "with its task's history (delete_task with cleanup_executions): it ended" in status["message"]
    await _until(lambda: "tool" not in registry.worker.consumers, "the worker to stop serving it")
    reply, _ = await registry.call(client, "delete_task", {"task_id": "tool"})
    assert reply["error_code"] == "NOT_FOUND"


async def test_a_delete_reads_the_states_of_its_own_task_only(registry, client, roots, monkeypatch):
    """probe28: a delete scanned every task's states, twice, and took 8-20 s where results of
    megabytes were kept (the SDK's 10 s ran out first). It reads its own task's: what it reads of
    the state bucket does not grow with other tasks' executions."""
    write_script(roots / "tool.sh")
    await register(registry, client, "small", process_spec("tool.sh", functions="run"))
    done, _ = await registry.call(client, "invoke_function", call_body("run", task_id="small", k=1))
    assert done["success"], done
    for n in range(40):  # another task's executions, each with its state
        reply, _ = await registry.call(client, "invoke_function", invoke_body("echo", value=n))
        assert reply["success"], reply
    await poll_until(lambda: registry.service.execution_state(reply["execution_id"]), timeout_s=10)
    read: list[str] = []
    real = directget.read_request

    async def counted(nc, stream, request, timeout):
        batch = await real(nc, stream, request, timeout)
        read.extend(found.subject for found in batch.found if stream.startswith("KV_"))
        return batch

    monkeypatch.setattr(directget, "read_request", counted)
    reply, _ = await registry.call(client, "delete_task", {"task_id": "small"})
    assert reply["success"], reply
    assert read and all(subject.endswith(done["execution_id"]) for subject in read), read


async def test_forced_delete_cancels_a_running_execution_and_keeps_its_history(registry, client, roots, tmp_path):
    pids = write_sleeper(roots, tmp_path)
    await register(registry, client, "tool", process_spec("tool.sh", functions="sleep"))
    reply, _ = await registry.call(client, "invoke_function", call_body("sleep", "ASYNC", task_id="tool"))
    await registry.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_RUNNING"))
    await _until(pids.exists, "the script to start its child")
    deleted, _ = await registry.call(client, "delete_task", {"task_id": "tool", "force": True})
    assert deleted["success"] and deleted["cleaned_executions"] == 0
    status, _ = await registry.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_CANCELLED"))
    assert status["result"]["error_code"] == "CANCELLED"
    await _until_ended(pids, "the cancelled script and its child to be killed")


# --- listing, restarts, HTTP -----------------------------------------------------------------------


async def test_list_tasks_pages_over_250_registered_tasks(registry, client, roots):
    checksum = write_script(roots / "echo.sh")
    spec = process_spec("echo.sh", checksum)
    replies = await asyncio.gather(*(register(registry, client, f"bulk-{i:03d}", spec) for i in range(250)))
    assert all(reply["success"] for reply in replies)
    seen, cursor, pages = [], "", 0
    while True:
        page, _ = await registry.call(client, "list_tasks", {"prefix": "bulk-", "limit": 100, "start_after": cursor})
        seen += [task["task_id"] for task in page["tasks"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_start_after"] == ""
            break
        cursor = page["next_start_after"]
    assert pages == 3 and seen == [f"bulk-{i:03d}" for i in range(250)]


async def test_the_registry_is_rebuilt_after_a_restart(open_settings, client, roots):
    write_script(roots / "echo.sh")
    async with AsyncExitStack() as stack:
        first = await start_spear(stack, open_settings)
        await register(first, client, "kept", process_spec("echo.sh"))
        await register(first, client, "gone", process_spec("echo.sh"))
        reply, _ = await first.call(client, "delete_task", {"task_id": "gone"})
        assert reply["success"]
    async with AsyncExitStack() as stack:  # everything anew: only the stream remembers
        again = await start_spear(stack, open_settings)
        listed, _ = await again.call(client, "list_tasks", {"prefix": "", "limit": 10})
        ids = [task["task_id"] for task in listed["tasks"]]
        assert "kept" in ids and "gone" not in ids
        reply, _ = await again.call(client, "invoke_function", call_body("run", task_id="kept", z=1))
        assert reply["result"]["result"] == {"z": 1}


async def test_http_register_get_and_delete_need_the_routes(open_settings, roots):
    from tests.processes import free_port

    write_script(roots / "echo.sh")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)
        await components.start_worker(stack, running.nc, open_settings, [demo])
        port = free_port()
        await components.start_http(stack, running.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            body = {"task_id": "web", "artifact_spec": process_spec("echo.sh")}
            async with session.post("/api/v1/tasks", json=body) as response:
                assert response.status == 201 and (await response.json())["task_id"] == "web"
                assert response.headers["Location"] == "/api/v1/tasks/web"
            async with session.post("/api/v1/tasks", json=body) as response:
                assert response.status == 200  # idempotent
                assert response.headers["Location"] == "/api/v1/tasks/web"
            async with session.post("/api/v1/tasks", json={"artifact_spec": process_spec("echo.sh")}) as response:
                made = (await response.json())["task_id"]  # an id of the server's
                assert response.status == 201 and response.headers["Location"] == f"/api/v1/tasks/{made}"
            async with session.get(f"/api/v1/tasks/{made}") as response:
                assert response.status == 200
            async with session.get("/api/v1/tasks/web") as response:
                assert (await response.json())["task"]["artifact_spec"]["location"] == "echo.sh"
            async with session.delete("/api/v1/tasks/web?force=true") as response:
                assert response.status == 200 and (await response.json())["success"]
            async with session.get("/api/v1/tasks/web") as response:
                assert response.status == 404


async def test_with_nats_invoke_registers_off_only_http_callers_register_by_invoking(open_settings, client, roots):
    """`spear up --secure` turns it off (NATS does not say who asks; probe19: the client role
    registered tasks by invoking): over HTTP the admin check (here: tokens off) lets it through."""
    from tests.processes import free_port

    write_script(roots / "echo.sh")
    closed = with_overrides(open_settings, tasks={"nats_invoke_registers": False})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, closed)
        port = free_port()
        await components.start_http(stack, running.service, port, host="127.0.0.1")
        body = {**call_body("run", task_id="viahttp", v=1), "invocation_type": "NEW_TASK"}
        body["artifact_spec"] = process_spec("echo.sh")
        refused, headers = await running.call(client, "invoke_function", body)
        assert refused["error_code"] == "PERMISSION_DENIED" and headers["Nats-Service-Error-Code"] == "403", refused
        assert await registry_events(running, "viahttp") == []
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session,
            session.post("/api/v1/invoke", json=body) as response,
        ):
            reply = await response.json()
            assert response.status == 200 and reply["result"]["result"] == {"v": 1}, reply
        assert await registry_events(running, "viahttp") == ["registered"]
        again, _ = await running.call(client, "invoke_function", {**body, "parameters": [{"name": "v", "value": 2}]})
        assert again["result"]["result"] == {"v": 2}, again  # registered now, with this artifact: invoked


async def test_http_delete_takes_its_options_from_the_body_and_the_query_together(open_settings, roots):
    """`?force=true` with a JSON body `{}` was dropped (review14: 409 "delete with force")."""
    from tests.processes import free_port

    write_script(roots / "echo.sh")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)  # nothing runs: it stays pending
        port = free_port()
        await components.start_http(stack, running.service, port, host="127.0.0.1")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            body = {"task_id": "web", "artifact_spec": process_spec("echo.sh")}
            async with session.post("/api/v1/tasks", json=body) as response:
                assert response.status == 201
            async with session.post("/api/v1/invoke", json=call_body("run", "ASYNC", task_id="web")) as response:
                assert response.status == 202
            async with session.delete("/api/v1/tasks/web?force=true", json={"force": False}) as response:
                refused = await response.json()
                assert response.status == 400 and "in the body and True in the query" in refused["message"], refused
            async with session.delete("/api/v1/tasks/web?force=true", json={}) as response:
                reply = await response.json()
                assert response.status == 200 and reply["deleted"] and reply["cancelled_executions"] == 1, reply


async def test_a_spear_worker_process_picks_up_a_registered_task_without_restart(
    open_settings, client, roots, tmp_path
):
    from tests.conftest import until_registered
    from tests.processes import spawn, stop

    write_script(roots / "echo.sh")
    env = {"SPEAR_TASKS__ARTIFACT_ROOTS": str(roots)}
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)
        url = open_settings.nats.urls[0]
        worker = await spawn(
            "worker", "--nats-url", url, prefix=running.names.prefix, log_path=tmp_path / "w.log", env=env
        )
        try:
            await until_registered(running, "demo")  # the worker process is up
            await register(running, client, "echo", process_spec("echo.sh"))
            reply, _ = await running.call(client, "invoke_function", call_body("run", task_id="echo", p=1))
            assert reply["result"]["result"] == {"p": 1}, reply
            task, _ = await running.call(client, "get_task", {"task_id": "echo"})
            assert len(task["task"]["workers"]) == 1 and task["task"]["instances"][0]["calls"] == 1
        finally:
            assert await stop(worker) == 0, (tmp_path / "w.log").read_text()[-3000:]


async def test_a_writers_own_apply_does_not_hide_events_it_has_not_read(settings, client):
    """A gateway applies its own registration at once; events stored before it by others, not
    read yet, still come in on the next read."""
    from spear.core.contract import TaskInfo
    from spear.core.taskevents import TaskDeleted, TaskRegistered
    from spear.jetstream import topology
    from spear.jetstream.registrystore import RegistryFollower, RegistryStore

    names = Names(settings.subject_prefix)
    await topology.ensure_base(client, names)
    store = RegistryStore(client, names)
    follower = RegistryFollower(store)
    others = TaskRegistered(task_id="other", at="2026-01-01T00:00:00.000Z", task=TaskInfo(task_id="other"))
    mine = TaskRegistered(task_id="mine", at="2026-01-01T00:00:01.000Z", task=TaskInfo(task_id="mine"))
    await store.append(others, expect_last_seq=0)  # another gateway's, not read here yet
    follower.apply(mine, await store.append(mine, expect_last_seq=0))
    await follower.catch_up()
    assert sorted(follower.registry.tasks) == ["mine", "other"]
    gone = TaskDeleted(task_id="other", at="2026-01-01T00:00:02.000Z")
    with pytest.raises(AppendConflict):  # fenced on the task's last event
        await store.append(gone, expect_last_seq=0)
    await store.append(gone, expect_last_seq=1)
    await follower.catch_up()
    follower.apply(others, 1)  # an old event again: nothing changes
    assert sorted(follower.registry.tasks) == ["mine"]


async def test_the_python_client_registers_reads_and_deletes(registry, roots):
    from spear import errors
    from spear.client import Client

    checksum = write_script(roots / "echo.sh")
    write_script(roots / "tool.sh")
    async with Client(registry.settings.nats.urls, prefix=registry.names.prefix) as sdk:
        task = await sdk.register_task(
            "process", "echo.sh", task_id="sdk", checksum=checksum, metadata={"functions": "run"}
        )
        assert task["task_id"] == "sdk" and task["registered"] is True
        assert await sdk.invoke("sdk", "run", q=1) == {"q": 1}
        assert (await sdk.task("sdk"))["functions"][0]["name"] == "run"
        with pytest.raises(errors.AlreadyExists):
            await sdk.register_task("process", "tool.sh", task_id="sdk")
        assert (await sdk.delete_task("sdk", cleanup_executions=True))["cleaned_executions"] == 1
        with pytest.raises(errors.NotFound):
            await sdk.task("sdk")


async def test_a_stopped_worker_applies_no_more_registry_changes(registry, caplog):
    """Registry changes still queued when a worker stops are dropped, not applied on a connection
    that may be gone: its follower's cancellation can be lost (Python 3.11), and it went on
    through the queue logging a failure per event (250 of them, in other tests' logs)."""
    import logging

    from spear.core.contract import TaskInfo
    from spear.core.taskevents import TaskRegistered

    worker = registry.worker
    await worker.stop()
    for i in range(3):
        task_id = f"late-{i}"
        worker._registry_changes.put_nowait(
            TaskRegistered(task_id=task_id, at="2026-01-01T00:00:00.000Z", task=TaskInfo(task_id=task_id))
        )
    with caplog.at_level(logging.ERROR):
        await worker._apply_registry_changes()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any(task_id.startswith("late-") for task_id in worker.consumers)


async def test_a_process_artifact_dies_with_its_worker(open_settings, roots, client, tmp_path):
    """probe36: a `spear worker` killed with SIGKILL left its process artifacts running; each
    wrote its side effect, and the redelivered invocation ran the script again beside it. The
    script now dies with its worker, whatever signal ended that."""
    from tests.processes import spawn_worker

    marks = tmp_path / "marks"
    write_script(
        roots / "mark.sh",
        f"#!/bin/sh\ncat >/dev/null\necho started >> {marks}\nsleep 3\necho done >> {marks}\necho null\n",
    )
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)
        assert (await register(running, client, "marks", process_spec("mark.sh")))["success"]
        env = {"SPEAR_TASKS__ARTIFACT_ROOTS": str(roots), "SPEAR_TASKS__ALLOW_REGISTRATION": "true"}
        url = open_settings.nats.urls[0]
        worker = await spawn_worker(stack, url, open_settings.subject_prefix, tmp_path / "worker.log", env=env)
        body = {"task_id": "marks", "function_name": "run", "execution_mode": "ASYNC"}
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"], reply
        await poll_until(lambda: asyncio.sleep(0, marks.exists()), bool, timeout_s=20, what="the script started")
        worker.kill()
        await worker.wait()
        await asyncio.sleep(4)  # past the script's sleep
        assert marks.read_text() == "started\n", (tmp_path / "worker.log").read_text()[-2000:]


# A process artifact that starts a program of its own (`sleep`, in its process group), writes both
# pids, and waits
STARTS_A_PROGRAM = """#!/bin/sh
case "$1" in
  run) cat >/dev/null; echo null ;;
  wait) cat >/dev/null; sleep 300 & echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}; sleep 300; echo null ;;
  serve) sleep 300 & echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}; read -r call; sleep 300 ;;
esac
"""


@pytest.mark.parametrize("long_lived", [False, True], ids=["a_call", "long_lived"])
async def test_what_a_process_artifact_started_dies_with_its_worker_too(
    open_settings, roots, client, tmp_path, long_lived
):
    """PR_SET_PDEATHSIG reaches the artifact's own process only: what it started (its process
    group) ran on, orphaned, after its worker was killed with SIGKILL, beside the run of the
    redelivered invocation (review38). The worker's reaper now kills the group."""
    from tests.processes import gone_within, group_members, read_pids, spawn_worker

    pids_file = tmp_path / "pids"
    write_script(roots / "starts.sh", STARTS_A_PROGRAM.format(pids=pids_file))
    spec = process_spec("starts.sh", functions="run,wait", **({"long_lived": "true"} if long_lived else {}))
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)
        assert (await register(running, client, "starts", spec))["success"]
        env = {"SPEAR_TASKS__ARTIFACT_ROOTS": str(roots), "SPEAR_TASKS__ALLOW_REGISTRATION": "true"}
        worker = await spawn_worker(
            stack, open_settings.nats.urls[0], open_settings.subject_prefix, tmp_path / "worker.log", env=env
        )
        body = {"task_id": "starts", "function_name": "wait", "execution_mode": "ASYNC"}
        reply, _ = await running.call(client, "invoke_function", body)
        assert reply["success"], reply
        script, program = await read_pids(pids_file)
        group = await poll_until(  # the script, its `sleep &` and its `sleep`
            lambda: asyncio.to_thread(group_members, script), lambda found: len(found) == 3, timeout_s=10
        )
        assert program in group, group
        reapers = await asyncio.to_thread(_reapers_of, worker.pid)
        worker.kill()
        await worker.wait()
        assert await gone_within(group, 5) == [], "what the artifact started outlived its worker"
        assert await gone_within(reapers, 5) == [], "the reaper outlived its worker"


async def test_a_stopped_worker_leaves_no_reaper_behind(open_settings, roots, client, tmp_path):
    """The reaper (one per worker process, started with its first process artifact) ends with
    its worker's clean stop; it runs in a session of its own, with none of spear's environment."""
    from tests.processes import gone_within, spawn_worker, stop

    write_script(roots / "starts.sh", STARTS_A_PROGRAM.format(pids=tmp_path / "pids"))
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)
        assert (await register(running, client, "starts", process_spec("starts.sh", functions="run,wait")))["success"]
        env = {
            "SPEAR_TASKS__ARTIFACT_ROOTS": str(roots),
            "SPEAR_TASKS__ALLOW_REGISTRATION": "true",
            "SPEAR_NATS__PASSWORD": "the-workers-secret",  # (not used by this server)
        }
        worker = await spawn_worker(
            stack, open_settings.nats.urls[0], open_settings.subject_prefix, tmp_path / "worker.log", env=env
        )
        body = {"task_id": "starts", "function_name": "run", "execution_mode": "ASYNC"}
        reply, _ = await running.call(client, "invoke_function", body)
        await running.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_COMPLETED"), 30)
        (reaper,) = _reapers_of(worker.pid)
        assert await asyncio.to_thread(Path(f"/proc/{reaper}/environ").read_bytes) == b""
        assert os.getsid(reaper) == reaper != os.getsid(worker.pid)
        assert await stop(worker) == 0
        assert await gone_within([reaper], 5) == [], "the reaper outlived its worker"


def _reapers_of(pid: int) -> list[int]:
    """The reaper processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and (entry / "cmdline").read_bytes().endswith(b"\0spear-reaper\0"):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


async def test_a_worker_started_after_a_delete_never_serves_the_deleted_task(open_settings, roots, client, caplog):
    """probe36: a worker replays the registry at start, and applied each event in turn: every
    task ever registered was served (its consumer made, pulled from), then, for a deleted one,
    no longer served, at every worker start. Each task's last event alone is applied."""
    import logging

    write_script(roots / "gone.sh")
    write_script(roots / "kept.sh")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings)
        for task_id in ("gone", "kept"):
            assert (await register(running, client, task_id, process_spec(f"{task_id}.sh")))["success"]
        caplog.set_level(logging.INFO, logger="spear.worker.worker")
        reply, _ = await running.call(client, "delete_task", {"task_id": "gone"})
        assert reply["success"], reply
        await poll_until(  # (the running worker saw it)
            lambda: asyncio.sleep(0, "task gone deleted" in caplog.text), bool, timeout_s=10, what="the delete applied"
        )
        caplog.clear()
        await components.start_worker(stack, running.nc, open_settings, [demo])
        said = [r.getMessage() for r in caplog.records]
        assert "worker: serving registered task kept" in said, said
        assert not [line for line in said if "task gone" in line], said


async def test_a_spear_up_for_registered_tasks_alone_starts_and_serves_them(roots, tmp_path):
    """probe39: `[worker] demo = false` with registration allowed and no `--task` refused to start
    ("no task to serve"), though it would serve whatever is registered."""
    import nats

    from tests.processes import PROCESS_START_S, free_port, spawn, stop, wait_ready

    write_script(roots / "echo.sh")
    env = {
        "SPEAR_WORKER__DEMO": "false",
        "SPEAR_TASKS__ALLOW_REGISTRATION": "true",
        "SPEAR_TASKS__ARTIFACT_ROOTS": str(roots),
    }
    args = ("up", "--data-dir", str(tmp_path / "data"), "--nats-port", "-1", "--http-port", str(free_port()))
    up = await spawn(*args, log_path=tmp_path / "up.log", env=env)
    try:
        url = await wait_ready(up, PROCESS_START_S)
        client = await nats.connect(url)
        try:
            body = {"task_id": "echoes", "artifact_spec": process_spec("echo.sh")}
            registered = json.loads(
                (await client.request("spear.api.register_task", json.dumps(body).encode(), 10)).data
            )
            assert registered["success"], registered
            call = {"task_id": "echoes", "function_name": "run", "parameters": [{"name": "x", "value": 7}]}
            reply = json.loads((await client.request("spear.api.invoke_function", json.dumps(call).encode(), 30)).data)
            assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and reply["result"]["result"] == {
                "x": 7
            }, reply
            tasks = json.loads((await client.request("spear.api.list_tasks", b"{}", 10)).data)
            assert [t["task_id"] for t in tasks["tasks"]] == ["echoes"], tasks  # (no demo)
        finally:
            await client.close()
    finally:
        assert await stop(up) == 0, (tmp_path / "up.log").read_text()[-2000:]


@pytest.mark.parametrize("worker_roots", [[], ["elsewhere"]])
async def test_a_worker_whose_roots_do_not_allow_a_registered_task_does_not_serve_it(
    open_settings, roots, client, caplog, worker_roots, tmp_path
):
    """probe41: a spear up restarted with no artifact_roots served (and listed) a task registered
    before, and every call of it was stored, then FAILED ("artifact unusable"). A worker whose
    roots do not allow the artifact leaves the task to a worker that may run it: its calls wait,
    and health names the task."""
    import logging

    write_script(roots / "t.sh")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, open_settings, with_worker=False)
        assert (await register(running, client, "t", process_spec(str(roots / "t.sh"))))["success"]
        caplog.set_level(logging.INFO, logger="spear.worker.worker")
        barred = with_overrides(open_settings, tasks={"artifact_roots": [str(tmp_path / r) for r in worker_roots]})
        worker = await components.start_worker(stack, running.nc, barred, [demo])
        said = [r.getMessage() for r in caplog.records]
        assert any(line.startswith("worker: registered task t not served: ") for line in said), said
        assert "t" not in worker.registered and "t" not in worker.consumers
        workers, _ = await running.call(client, "list_workers", {})
        assert [w["tasks"] for w in workers["workers"]] == [["demo"]], workers
        reply, _ = await running.call(client, "invoke_function", call_body("run", mode="ASYNC", task_id="t", x=1))
        health = await running.service.health()
        assert "no worker serves task 't' (1 invocation pending)" in health.message, health
        await components.start_worker(stack, running.nc, open_settings, [demo])  # one that may run it
        status, _ = await running.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_COMPLETED"))
        assert status["result"]["result"] == {"x": 1}, status


async def test_a_process_artifact_ended_by_a_stop_signal_with_its_worker_is_handed_back(registry, client, roots):
    """probe45: systemd's stop signals every process of the unit at once: the artifact died of
    that SIGTERM, and its call ended FAILED ("exited with code -15"), its retries used. With its
    worker stopping, that is a stop: the attempt is handed back (`released`)."""
    checksum = write_script(roots / "sleepy.sh")
    spec = process_spec("sleepy.sh", checksum, functions="sleep")
    assert (await register(registry, client, "sleepy", spec))["success"]
    body = {**call_body("sleep", "ASYNC", task_id="sleepy"), "context": {"max_retries": 0}}
    reply, _ = await registry.call(client, "invoke_function", body)
    execution_id = reply["execution_id"]
    await registry.status_until(client, execution_id, has_status("EXECUTION_STATUS_RUNNING"))
    script = b"SPEAR_ARTIFACT_PATH=" + str(roots / "sleepy.sh").encode() + b"\0"
    pids = await poll_until(
        lambda: asyncio.sleep(0, [p for p in _pids() if script in _environ(p)]), bool, timeout_s=10, what="its pid"
    )
    for group in {os.getpgid(pid) for pid in pids}:
        os.killpg(group, signal.SIGTERM)  # the artifact and what it started: its process group
    assert registry.worker is not None
    await registry.worker.stop(grace_s=5)
    kinds = [s.event.kind for s in await registry.service.store.history(execution_id)]
    assert kinds[-1] == "released" and "failed" not in kinds, kinds


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""
