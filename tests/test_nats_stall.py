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

from spear.aio import poll_until
from spear.cli import components
from spear.core.config import load_settings, with_overrides
from spear.core.contract import GetHealthRequest, InvokeFunctionRequest
from spear.core.enums import ExecutionStatus
from spear.jetstream import pongs
from spear.jetstream.connection import connect
from spear.jetstream.embedded import EmbeddedNats
from tests.conftest import has_status, invoke_body, start_spear, until_registered
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


@pytest.mark.parametrize(
    ("context", "kind", "final"),
    [
        ({}, "completed", ExecutionStatus.COMPLETED),
        # attempt 1 runs past its time limit: its end is a `retrying`, the invocation handed back
        ({"timeout_ms": 1000, "max_retries": 1}, "retrying", ExecutionStatus.TIMEOUT),
    ],
)
async def test_an_end_stored_whose_acknowledgement_was_lost_is_said_stored_not_fenced_off(
    own_server, caplog, context, kind, final
):
    """probe: nats-server frozen while a worker stored an attempt's end. The append was stored
    once the server went on, its acknowledgement lost; the try sent again was refused by its fence
    (checked before its message id). The worker read its own end back: said stored at INFO, the
    delivery settled as for any stored end; not WARNING "fenced off: the execution ended
    meanwhile", which reads as a lost or doubled result."""
    server, url = own_server
    settings = with_overrides(load_settings(), nats={"urls": [url], "request_timeout_ms": 300})
    caplog.set_level(logging.INFO, logger="spear.worker.worker")
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        await until_registered(running, "demo")
        client = await connect(settings, "test-client")
        stack.push_async_callback(client.close)
        body = {**invoke_body("sleep", "ASYNC", ms=1800 if kind == "completed" else 1500), "context": context}
        reply, _ = await running.call(client, "invoke_function", body)
        execution_id = reply["execution_id"]
        await running.status_until(client, execution_id, has_status(ExecutionStatus.RUNNING))
        await _stall(server)
        try:
            await asyncio.sleep(3)  # the attempt ends: its end sent, not answered, sent again
        finally:
            server.process.send_signal(signal.SIGCONT)
        await running.status_until(client, execution_id, has_status(final), timeout=30)

        def said() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "spear.worker.worker" and execution_id in r.getMessage()]

        def decided(records: list[logging.LogRecord]) -> bool:  # (the status may be read first)
            return any("acknowledgement was lost" in r.getMessage() or "fenced off" in r.getMessage() for r in records)

        await poll_until(lambda: asyncio.sleep(0, said()), decided, timeout_s=10)
        messages = [(r.levelname, r.getMessage()) for r in said()]
        tried = [r.getMessage() for r in caplog.records if "the end of an attempt is not stored yet" in r.getMessage()]
        assert tried, caplog.text  # (the stall came when it was meant to)
        own = f"result of {execution_id} attempt 1 ({kind}) stored before its acknowledgement was lost"
        assert [level for level, m in messages if own in m] == ["INFO"], messages
        assert not [m for level, m in messages if "fenced off" in m or level == "WARNING"], messages
        history = [event for event, _ in await running.service.store.history(execution_id)]
        ends = [(e.kind, e.attempt) for e in history if e.kind in ("retrying", "completed", "failed", "timed_out")]
        expected = [("completed", 1)] if kind == "completed" else [("retrying", 1), ("timed_out", 2)]
        assert ends == expected, history  # its end stored once
        stream, consumer = running.names.stream, running.names.worker_consumer("demo")

        async def settled() -> bool:
            info = await client.jetstream().consumer_info(stream, consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await poll_until(settled, bool, timeout_s=10)  # the delivery acknowledged
