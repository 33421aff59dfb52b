"""SYNC latency and ASYNC completions per second of a function that is not inline
(`demo.sleep(ms=0)`), against a `spear up --workers 2` this script starts and stops: what
`spear bench` (whose `echo` is inline) does not show (docs/performance.md, twentieth round).

    python scripts/noninline.py .venv/bin/spear      # any installed spear's command
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time

import nats

NATS_PORT, HTTP_PORT = 59300, 59301
SYNC_CALLS, ASYNC_CALLS, IN_FLIGHT = 1500, 6000, 64


def _body(mode: str) -> bytes:
    call = {
        "task_id": "demo",
        "function_name": "sleep",
        "execution_mode": mode,
        "parameters": [{"name": "ms", "value": 0}],
    }
    return json.dumps(call).encode()


async def measure(spear_command: str) -> dict[str, float]:
    """SYNC p50 / p99 (ms) and ASYNC completed per s, against a spear up of `spear_command`."""
    data = tempfile.mkdtemp()
    command = [spear_command, "up", "--data-dir", data, "--nats-port", str(NATS_PORT), "--http-port", str(HTTP_PORT)]
    up = await asyncio.create_subprocess_exec(
        *command, "--workers", "2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert up.stdout is not None
        await up.stdout.readline()  # the ready line
        nc = await nats.connect(f"nats://127.0.0.1:{NATS_PORT}")
        for _ in range(200):  # warm-up
            await nc.request("spear.api.invoke_function", _body("SYNC"), timeout=10)
        took = []
        for _ in range(SYNC_CALLS):
            began = time.perf_counter()
            reply = await nc.request("spear.api.invoke_function", _body("SYNC"), timeout=10)
            took.append(time.perf_counter() - began)
            assert json.loads(reply.data)["success"], reply.data
        took.sort()
        ended, all_ended = 0, asyncio.Event()

        async def count(_: object) -> None:
            nonlocal ended
            ended += 1
            if ended >= ASYNC_CALLS:
                all_ended.set()

        await nc.subscribe("spear.exec.*.*.completed", cb=count)
        lanes = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with lanes:
                await nc.request("spear.api.invoke_function", _body("ASYNC"), timeout=30)

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(ASYNC_CALLS)))
        await asyncio.wait_for(all_ended.wait(), 120)
        elapsed = time.perf_counter() - began
        await nc.close()
        return {
            "sync_p50_ms": round(took[len(took) // 2] * 1000, 3),
            "sync_p99_ms": round(took[int(len(took) * 0.99)] * 1000, 3),
            "async_completed_per_s": round(ASYNC_CALLS / elapsed),
        }
    finally:
        up.send_signal(signal.SIGTERM)
        await asyncio.wait_for(up.wait(), 30)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(sys.argv[1]))))
