"""The web view's cost under load: ASYNC calls with the executions page open in a headless
chromium, or with no page, and the CPU of the `spear up` process (gateway and HTTP API) per call.

    python scripts/web_page_load.py page 20000   # 20,000 calls, the page open
    python scripts/web_page_load.py none 20000   # the same, no page

It starts its own `spear up --workers 2` (temporary data dir, free ports), sends `demo.echo` ASYNC
with 64 in flight over NATS and prints one JSON object: calls accepted per s and spear up's CPU µs
per call (from /proc). Needs Playwright and Debian's chromium (`make test` installs both).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import nats

from spear.cli.bench.command import free_port

CHROMIUM = "/usr/bin/chromium"
IN_FLIGHT = 64


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(page_open: bool, calls: int) -> None:
    """Start spear up, open the page if asked, send `calls` calls, print what they cost."""
    nats_port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "spear", "up", "--data-dir", tempfile.mkdtemp(), "--workers", "2"]
    command += ["--nats-port", str(nats_port), "--http-port", str(http_port)]
    up = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert up.stdout is not None
    await up.stdout.readline()  # the ready line
    browser: Any = None
    playwright: Any = None
    if page_open:
        from playwright.async_api import async_playwright

        playwright = await async_playwright().start()
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{http_port}/#/executions")
        await asyncio.sleep(1)
    nc = await nats.connect(f"nats://127.0.0.1:{nats_port}")
    body = json.dumps(
        {
            "task_id": "demo",
            "function_name": "echo",
            "execution_mode": "ASYNC",
            "parameters": [{"name": "value", "value": 1}],
        }
    ).encode()
    window = asyncio.Semaphore(IN_FLIGHT)

    async def call() -> None:
        async with window:
            await nc.request("spear.api.invoke_function", body, timeout=30)

    cpu_before, began = cpu_s(up.pid), time.monotonic()
    await asyncio.gather(*(call() for _ in range(calls)))
    took, cpu = time.monotonic() - began, cpu_s(up.pid) - cpu_before
    result = {
        "page_open": page_open,
        "accepted_per_s": round(calls / took),
        "spear_up_cpu_us_per_call": round(1e6 * cpu / calls),
    }
    print(json.dumps(result), flush=True)
    await nc.close()
    if browser is not None:
        await browser.close()
        await playwright.stop()
    up.terminate()
    await asyncio.wait_for(up.wait(), 20)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] == "page", int(sys.argv[2])))
