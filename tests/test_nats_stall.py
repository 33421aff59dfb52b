"""A nats-server that stalls (SIGSTOP: frozen, its connections open) and goes on: spear serves
again once it answers, whatever was asked of it meanwhile (probe26: a health check during a 9 s
stall left the gateway's connection deaf for good)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from spear.cli import components
from spear.core.config import load_settings, with_overrides
from spear.core.contract import GetHealthRequest, InvokeFunctionRequest
from spear.jetstream import pongs
from spear.jetstream.connection import connect
from spear.jetstream.embedded import EmbeddedNats
from tests.conftest import invoke_body, start_spear, until_registered
from tests.processes import free_port


def _state(pid: int) -> bytes:
    """A process's state letter (T: stopped), from /proc."""
    return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]


async def _stall(server: EmbeddedNats) -> None:
    """Freeze the server, and wait until it is (a signal takes a moment to stop every thread)."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    for _ in range(100):
        if _state(server.process.pid) == b"T":
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nats-server did not stop")


@pytest.fixture
def own_server(tmp_path):
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = server.start()
    yield server, url
    server.stop()


async def test_a_flush_given_up_on_leaves_the_connection_reading(own_server):
    """A flush whose PONG comes after its timeout: the PONG, when it comes, is taken as the
    answer to that PING, and the connection goes on reading (nats-py's own ends its read loop on
    it: every later request then times out)."""
    server, url = own_server
    pongs.install()  # (as every connection spear makes)
    nc = await nats.connect(url)
    try:
        await _stall(server)
        try:
            with pytest.raises(nats.errors.FlushTimeoutError):
                await nc.flush(timeout=0.3)
        finally:
            server.process.send_signal(signal.SIGCONT)
        await nc.flush(timeout=5)  # the late PONG, then this one's

        async def echo(msg):
            await msg.respond(msg.data)

        sub = await nc.subscribe("stall.echo", cb=echo)
        reply = await nc.request("stall.echo", b"again", timeout=5)
        assert reply.data == b"again"
        await sub.unsubscribe()
    finally:
        await nc.close()


async def test_spear_serves_again_after_a_stall_it_was_asked_about_during(own_server):
    """Health asked during a stall (its ping gives up after a second) says NATS does not answer;
    once the server goes on, health is healthy again and calls are served, without a restart."""
    server, url = own_server
    settings = with_overrides(load_settings(), nats={"urls": [url]})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        await until_registered(running, "demo")
        service = running.service
        await _stall(server)
        try:
            during = await service.health(GetHealthRequest())
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert during.status != "healthy"
        request = msgspec.json.decode(json.dumps(invoke_body("echo", value=5)), type=InvokeFunctionRequest)
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        while True:  # (JetStream may take a moment after the stall)
            health = await service.health(GetHealthRequest())
            if health.status == "healthy" or loop.time() > end:
                break
            await asyncio.sleep(0.2)
        assert health.status == "healthy", health
        reply = await service.invoke(request)
        assert reply.success and reply.result is not None and reply.result.result == 5, reply
        client = await connect(settings, "test-client")
        stack.push_async_callback(client.close)
        answered, _ = await running.call(client, "invoke_function", invoke_body("echo", value=6))
        assert answered["result"]["result"] == 6


async def test_the_retention_sweep_says_a_stall_in_a_line(own_server, caplog):
    """A sweep that NATS does not answer is a warning of one line, as the other components say
    it, not an ERROR with a traceback (probe27)."""
    server, url = own_server
    settings = with_overrides(
        load_settings(),
        nats={"urls": [url], "request_timeout_ms": 300},
        async_execution={"status_retention_hours": 0.2 / 3600 * 4},  # a sweep every 0.2 s
    )
    async with AsyncExitStack() as stack:
        nc = await connect(settings, "test-projection")
        stack.push_async_callback(nc.close)
        await components.start_projection(stack, nc, settings)
        caplog.set_level(logging.WARNING, logger="spear.projection.retention")
        await _stall(server)
        try:
            await asyncio.sleep(1.5)  # sweeps that get no answer
        finally:
            server.process.send_signal(signal.SIGCONT)
        said = [r for r in caplog.records if r.name == "spear.projection.retention"]
        assert said and all(r.levelno == logging.WARNING and r.exc_info is None for r in said), said
        assert "sweep not done" in said[0].getMessage()
