"""Soak: N ASYNC executions against a `spear up`, with the resident memory (RSS) of every process
of its tree sampled along the way, to show that memory stays flat as executions pile up (state
lives in JetStream, not in RAM: issue 11 asks ±20% from 100,000 to 1,000,000 executions).

    python scripts/soak_rss.py -n 1000000                     # starts its own spear up --workers 2
    python scripts/soak_rss.py -n 50000 --sample-every 10000  # a short run
    python scripts/soak_rss.py -n 200000 --nats-url nats://127.0.0.1:4222 --pid <spear up's pid>

It sends `demo.echo` ASYNC with 64 in flight (backing off when spear says RESOURCE_EXHAUSTED),
samples RSS each `--sample-every` executions sent and once more at the end, after every execution
has ended and the projection has caught up. One JSON object per sample on stdout, a summary last
(`growth`: each process's RSS at the end over its RSS at the first sample at or after
`--baseline`); progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

from spear.cli.bench import CpuMeter, backpressure_s, free_port, stop_on_close

WINDOW = 64
ECHO = msgspec.json.encode(
    {
        "task_id": "demo",
        "function_name": "echo",
        "execution_mode": "ASYNC",
        "parameters": [{"name": "value", "value": 1}],
    }
)


def rss_mb(pid: int) -> float | None:
    """A process's resident memory in MB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def processes(root: int) -> dict[int, str]:
    """Every process of the tree under `root`: pid -> a short name (the spear component)."""
    named = {}
    for pid in CpuMeter(root).snapshot():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv if word]
        component = next((w for w in words if w in ("up", "worker", "projection", "gateway", "api")), "")
        named[pid] = "nats-server" if "nats-server" in " ".join(words[:1]) else f"spear {component}".strip()
    return named


def sample(root: int, sent: int, began: float) -> dict[str, Any]:
    """RSS of each process of the tree now."""
    rss = {f"{name} [{pid}]": rss_mb(pid) for pid, name in sorted(processes(root).items())}
    return {"executions": sent, "elapsed_s": round(time.monotonic() - began, 1), "rss_mb": rss}


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"soak: {text}", file=sys.stderr, flush=True)


async def send(nc: Client, prefix: str, count: int, on_sent: Any) -> None:
    """`count` ASYNC invocations, WINDOW in flight."""
    subject = f"{prefix}.api.invoke_function"
    left = [count]

    async def lane() -> None:
        while left[0] > 0:
            left[0] -= 1
            while True:
                reply = await nc.request(subject, ECHO, timeout=30)
                pause = backpressure_s(reply)
                if pause is None:
                    break
                await asyncio.sleep(pause)
            if b'"execution_id"' not in reply.data:
                raise RuntimeError(f"spear refused an invocation: {reply.data[:300]!r}")
            on_sent()

    await asyncio.gather(*(lane() for _ in range(WINDOW)))


async def settled(nc: Client, prefix: str, timeout_s: float = 600) -> None:
    """Until no invocation waits for a worker and the projection has folded every event."""
    js = nc.jetstream()
    stream = f"{prefix.upper()}_EXECUTIONS"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        backlog = 0
        for consumer in await js.consumers_info(stream):
            backlog += (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
        if backlog == 0:
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"spear did not settle within {timeout_s} s")


async def start_spear(stack: contextlib.AsyncExitStack, workers: int) -> tuple[str, int]:
    """`spear up` on a temporary data dir and a free NATS port; its NATS URL and pid."""
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spear-soak-")))
    argv = [sys.executable, "-m", "spear", "up", "--data-dir", str(data_dir), "--nats-port", "-1"]
    argv += ["--http-port", str(free_port()), "--workers", str(workers)]
    log = stack.enter_context((data_dir / "up.log").open("ab"))  # local, instant
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=log)

    stop_on_close(stack, process)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
    match = re.search(r"NATS (nats://\S+),", line)
    if not match:
        raise RuntimeError(f"spear up did not start: {line!r} (log: {data_dir / 'up.log'})")
    return match.group(1), process.pid


async def main(args: argparse.Namespace) -> int:
    """Run the soak; print the samples and the summary."""
    async with contextlib.AsyncExitStack() as stack:
        if args.nats_url:
            url, root = args.nats_url, args.pid
        else:
            url, root = await start_spear(stack, args.workers)
            progress(f"spear up (pid {root}) at {url}")
        nc = await nats.connect(url, name="spear-soak")
        stack.push_async_callback(nc.close)
        began = time.monotonic()
        samples: list[dict[str, Any]] = []
        sent = [0]

        def on_sent() -> None:
            sent[0] += 1
            if sent[0] % args.sample_every == 0:
                samples.append(sample(root, sent[0], began))
                print(json.dumps(samples[-1]), flush=True)
                progress(f"{sent[0]} sent, {sent[0] / (time.monotonic() - began):.0f}/s")

        await send(nc, args.prefix, args.n, on_sent)
        progress("all sent; waiting until every execution has ended and the projection caught up")
        await settled(nc, args.prefix)
        samples.append({**sample(root, sent[0], began), "settled": True})
        print(json.dumps(samples[-1]), flush=True)
        baseline = next((s for s in samples if s["executions"] >= args.baseline), samples[0])
        growth = {
            name: round(mb / baseline["rss_mb"][name], 3)
            for name, mb in samples[-1]["rss_mb"].items()
            if mb and baseline["rss_mb"].get(name)
        }
        print(json.dumps({"baseline_executions": baseline["executions"], "executions": sent[0], "growth": growth}))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="ASYNC executions to run")
    parser.add_argument("--sample-every", type=int, default=100_000, help="sample RSS each this many sent")
    parser.add_argument("--baseline", type=int, default=100_000, help="growth is measured from this sample on")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the spear up it starts")
    parser.add_argument("--nats-url", help="a running spear's NATS instead of starting one (needs --pid)")
    parser.add_argument("--pid", type=int, help="with --nats-url: the pid of its spear up (RSS of its tree)")
    parser.add_argument("--prefix", default="spear", help="its subject prefix")
    args = parser.parse_args(argv)
    if args.nats_url and not args.pid:
        parser.error("--nats-url needs --pid (whose process tree to sample)")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
