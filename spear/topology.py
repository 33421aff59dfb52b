"""Apply the JetStream topology kept as data in `streams/` (JetStream API JSON), idempotently.

Each file is the config the JetStream API takes, with `${PREFIX}`-style names substituted.
A missing stream or consumer is created, one whose config differs is updated, an equal one is
left alone, so every component can apply the topology at start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client

from spear.subjects import Names

STREAMS_DIR = Path(os.environ.get("SPEAR_STREAMS_DIR", Path(__file__).resolve().parent.parent / "streams"))


class JetStreamApiError(Exception):
    def __init__(self, code: int, err_code: int, description: str):
        super().__init__(f"JetStream API error {code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code


def load_config(filename: str, names: Names, **extra: str) -> dict[str, Any]:
    text = (STREAMS_DIR / filename).read_text()
    values = {
        "PREFIX": names.prefix,
        "STREAM": names.stream,
        "STATE_BUCKET": names.state_bucket,
        "TASKS_BUCKET": names.tasks_bucket,
        **extra,
    }
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    return json.loads(text)


async def api_request(nc: Client, subject: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    reply = await nc.request(f"$JS.API.{subject}", json.dumps(body).encode() if body else b"", timeout=timeout)
    data = json.loads(reply.data)
    if "error" in data:
        error = data["error"]
        raise JetStreamApiError(error.get("code", 0), error.get("err_code", 0), error.get("description", ""))
    return data


async def wait_for_jetstream(nc: Client, deadline_s: float = 30.0) -> None:
    """Poll with short timeouts: a cluster answers no API call before its leaders are elected."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            await api_request(nc, "INFO", None, timeout=1.0)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, JetStreamApiError):
            if loop.time() > end:
                raise
            await asyncio.sleep(0.2)


def _differs(wanted: dict[str, Any], actual: dict[str, Any]) -> bool:
    return any(actual.get(key) != value for key, value in wanted.items() if key != "description")


async def ensure_stream(nc: Client, config: dict[str, Any], timeout: float = 5.0) -> None:
    name = config["name"]
    try:
        info = await api_request(nc, f"STREAM.INFO.{name}", None, timeout)
    except JetStreamApiError as exc:
        if exc.err_code != 10059:  # stream not found
            raise
        await api_request(nc, f"STREAM.CREATE.{name}", config, timeout)
        return
    if _differs(config, info["config"]):
        await api_request(nc, f"STREAM.UPDATE.{name}", {**info["config"], **config}, timeout)


async def ensure_consumer(nc: Client, stream: str, config: dict[str, Any], timeout: float = 5.0) -> None:
    name = config["durable_name"]
    try:
        info = await api_request(nc, f"CONSUMER.INFO.{stream}.{name}", None, timeout)
        if not _differs(config, info["config"]):
            return
    except JetStreamApiError as exc:
        if exc.err_code != 10014:  # consumer not found
            raise
    await api_request(nc, f"CONSUMER.CREATE.{stream}.{name}", {"stream_name": stream, "config": config}, timeout)


async def ensure_base(nc: Client, names: Names, replicas: int = 1) -> None:
    """The executions stream and the read-model buckets: what every component needs."""
    await wait_for_jetstream(nc)
    for filename in ("executions.stream.json", "state.kv.json", "tasks.kv.json"):
        config = load_config(filename, names)
        config["num_replicas"] = replicas
        await ensure_stream(nc, config)


async def ensure_worker_consumer(nc: Client, names: Names, task_id: str, ack_wait_ms: int) -> str:
    config = load_config("worker.consumer.json", names, TASK_ID=task_id)
    config["ack_wait"] = ack_wait_ms * 1_000_000
    await ensure_consumer(nc, names.stream, config)
    return config["durable_name"]


async def ensure_projection_consumer(nc: Client, names: Names) -> str:
    config = load_config("projection.consumer.json", names)
    await ensure_consumer(nc, names.stream, config)
    return config["durable_name"]
