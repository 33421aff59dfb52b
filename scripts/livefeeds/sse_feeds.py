"""probe57 measurement: 300 (env CALLS) SYNC demo.echo calls over NATS (20 at a time) with N open SSE feeds.

usage: python scripts/livefeeds/sse_feeds.py NATS_PORT HTTP_PORT N MODE
  MODE: read     N feeds of GET /api/v1/events, each read continuously
        noread   N feeds of GET /api/v1/events, never read
        exec     N SSE clients of one STREAM execution's events (GET /api/v1/executions/{id}/events),
                 read continuously, while it yields chunks
"""

import asyncio
import json
import os
import sys
import time

import aiohttp
import nats

NATS_PORT, HTTP_PORT, N, MODE = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
CALLS = int(os.environ.get("CALLS", "300"))  # calls in the measured burst
HTTP = f"http://127.0.0.1:{HTTP_PORT}"
SSE = {"Accept": "text/event-stream"}


async def burst(nc, n=300):
    """`n` SYNC demo.echo calls over NATS, 20 at a time: (seconds, how many completed)."""
    began = time.time()
    sem = asyncio.Semaphore(20)

    async def one(k):
        body = {"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": k}]}
        async with sem:
            reply = await nc.request("spear.api.invoke_function", json.dumps(body).encode(), timeout=120)
        return json.loads(reply.data)["result"]["status"]

    results = await asyncio.gather(*(one(k) for k in range(n)), return_exceptions=True)
    return time.time() - began, sum(1 for r in results if r == "EXECUTION_STATUS_COMPLETED")


async def main():
    """The baseline, then the burst again with N feeds open."""
    nc = await nats.connect(f"nats://127.0.0.1:{NATS_PORT}")
    await burst(nc, 50)  # warm-up
    took, ok = await burst(nc)
    print(f"baseline: {took:.2f}s {ok} ok", flush=True)
    frames = [0] * N
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    ) as s:
        path = "/api/v1/events"
        if MODE == "exec":
            body = {"task_id": "demo", "function_name": "generate_text", "execution_mode": "STREAM"}
            body["parameters"] = [
                {"name": "prompt", "value": "w"},
                {"name": "tokens", "value": 100000},
                {"name": "delay_ms", "value": 1},
            ]
            async with s.post(HTTP + "/api/v1/invoke", json=body) as r:
                path = f"/api/v1/executions/{(await r.json())['execution_id']}/events"

        async def feed(i):
            async with s.get(HTTP + path, headers=SSE) as r:
                assert r.status == 200, r.status
                if MODE == "noread":
                    await asyncio.sleep(3600)
                tail = b"\n"
                async for chunk in r.content.iter_any():  # (cheap for the client: the burst shares its CPU)
                    frames[i] += (tail + chunk).count(b"\nid: ") - tail.count(b"\nid: ")
                    tail = chunk[-8:]

        tasks = [asyncio.create_task(feed(i)) for i in range(N)]
        await asyncio.sleep(3)
        failed = [t for t in tasks if t.done()]
        took, ok = await burst(nc, CALLS)
        spread = f"frames per feed min {min(frames, default=0)} max {max(frames, default=0)}"
        print(f"with {N} feeds ({MODE}): {took:.2f}s {ok} ok; {spread}; feeds ended early {len(failed)}", flush=True)
        async with s.get(HTTP + "/api/v1/health") as h:
            print("health", h.status)
        await asyncio.sleep(2)
        print(f"2 s later: frames per feed min {min(frames, default=0)} max {max(frames, default=0)}", flush=True)
        for t in tasks:
            t.cancel()
        if MODE == "exec":  # the streaming execution would go on for minutes
            async with s.post(HTTP + path.replace("/events", "/cancel"), json={"force": True}) as r:
                assert r.status == 200, await r.text()
        await asyncio.gather(*tasks, return_exceptions=True)
    await nc.close()


asyncio.run(main())
