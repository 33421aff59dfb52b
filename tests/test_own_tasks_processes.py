"""Users' own tasks served by real processes: `spear worker --task` and `spear up --task`, the
latter exactly as the README shows it (its code blocks are read from README.md, so they cannot drift)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import start_spear
from tests.processes import free_port, stop, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


async def spear_process(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None):
    """`spear …` as the README writes it, run as `python -m spear …` from `cwd`."""
    assert args[0] == "spear", args
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spear",
        *args[1:],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("ab"),
    )


async def test_the_readme_example_runs_as_written(tmp_path):
    section = readme_section("Your own functions")
    shop_code, context_example = code_blocks(section, "python")
    (tmp_path / "shop.py").write_text(shop_code)
    commands = [line for block in code_blocks(section, "sh") for line in block.strip().splitlines()]
    up_line = next(line for line in commands if line.startswith("spear up"))
    invoke_line = next(line for line in commands if line.startswith("spear invoke"))
    expected = json.loads(invoke_line.split("# result:")[1])
    curl = next(block for block in code_blocks(section, "sh") if "text/event-stream" in block)
    stream_body = json.loads(re.search(r"-d '(.*?)'", curl, flags=re.S).group(1))
    http_port = free_port()
    extra = ["--data-dir", str(tmp_path / "data"), "--nats-port", "-1", "--http-port", str(http_port)]
    up = await spear_process([*shlex.split(up_line), *extra], tmp_path, tmp_path / "up.log")
    try:
        url = await wait_ready(up, timeout=60)
        invoke = await spear_process(
            shlex.split(invoke_line, comments=True), tmp_path, tmp_path / "invoke.log", {"SPEAR_NATS_URL": url}
        )
        out, _ = await asyncio.wait_for(invoke.communicate(), 30)
        assert invoke.returncode == 0, (tmp_path / "invoke.log").read_text()
        assert json.loads(out) == expected  # the CLI prints the result
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{http_port}/api/v1/invoke",
                json=stream_body,
                headers={"Accept": "text/event-stream"},
            ) as response,
        ):
            frames = [frame.splitlines() for frame in (await response.text()).strip().split("\n\n")]
        data = [json.loads(lines[2].removeprefix("data: ")) for lines in frames]
        assert [d["data"] for d in data if d["type"] == "chunk"] == ["1. tea", "2. milk"]
        assert data[-1]["type"] == "completed" and data[-1]["result"]["result"] == "2 items"
    finally:
        assert await stop(up) == 0, (tmp_path / "up.log").read_text()[-3000:]
    namespace: dict[str, object] = {}
    exec(compile(context_example, "README.md", "exec"), namespace)  # the context example builds a task
    assert set(namespace["reports"].functions) == {"monthly"}  # type: ignore[attr-defined]


async def test_spear_worker_serves_an_own_module_and_only_it(settings, client, nats_url, tmp_path):
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        worker = await spear_process(
            ["spear", "worker", "--nats-url", nats_url, "--task", "tests.own_tasks:own"],
            ROOT,
            tmp_path / "worker.log",
            # (review59: the worker's own environment showed its NATS password to the code it runs)
            {
                "SPEAR_SUBJECT_PREFIX": settings.subject_prefix,
                "SPEAR_WORKER__DEMO": "false",
                "SPEAR_NATS__USER": "worker",
                "SPEAR_NATS__PASSWORD": "not-for-user-code",
            },
        )
        try:
            for _ in range(600):
                if running.service.tasks.get("own"):
                    break
                await asyncio.sleep(0.05)
            reply, _ = await running.call(
                client,
                "invoke_function",
                {
                    "task_id": "own",
                    "function_name": "add",
                    "parameters": [{"name": "a", "value": 40}, {"name": "b", "value": 2}],
                },
            )
            assert reply["result"]["result"] == 42, reply
            reply, _ = await running.call(
                client, "invoke_function", {"task_id": "own", "function_name": "spear_settings_seen"}
            )
            seen = reply["result"]["result"]
            assert "SPEAR_NATS__PASSWORD" not in seen and "SPEAR_SUBJECT_PREFIX" in seen, reply
            reply, _ = await running.call(client, "invoke_function", {"task_id": "demo", "function_name": "echo"})
            assert reply["error_code"] == "NOT_FOUND"  # demo = false: only the own task is served
        finally:
            assert await stop(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]


async def test_spear_up_serves_an_own_module_over_http(tmp_path):
    port = free_port()
    args = ["spear", "up", "--task", "tests.own_tasks:own", "--data-dir", str(tmp_path / "d"), "--nats-port", "-1"]
    up = await spear_process([*args, "--http-port", str(port)], ROOT, tmp_path / "up.log")
    try:
        await wait_ready(up, timeout=60)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            body = {"task_id": "own", "function_name": "about", "parameters": [{"name": "note", "value": "hi"}]}
            async with http.post("/api/v1/invoke", json=body) as response:
                reply = await response.json()
            assert response.status == 200 and reply["result"]["result"]["function_name"] == "about"
            assert reply["result"]["result"]["pid"] != up.pid  # ran in a worker process
            body = {"task_id": "own", "function_name": "add", "parameters": [{"name": "z", "value": 1}]}
            async with http.post("/api/v1/invoke", json=body) as response:
                assert response.status == 400
                assert "missing required parameter a; unknown parameter z" in (await response.json())["message"]
            async with http.get("/api/v1/tasks") as response:
                assert {t["task_id"] for t in (await response.json())["tasks"]} == {"demo", "own"}
    finally:
        assert await stop(up) == 0, (tmp_path / "up.log").read_text()[-3000:]
