"""Log lines name an execution only while its work is done: background work a call set off (a
consumer made for SYNC waits, a shared reader, a read shared by the callers of a moment) and the
NATS connection's own callbacks name none (probe67: a lost server was logged under the gateway's
first execution, ended ~90 s before)."""

import asyncio
import logging

from spear.aio import SharedReads, detached
from spear.core.config import load_settings, with_overrides
from spear.jetstream.connection import connect
from spear.telemetry import logs


class _Contexts(logging.Handler):
    """Each record's logger, message and the execution the log context named when it was made."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, str, tuple[str, str, str] | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.name, record.getMessage(), logs._execution.get()))


async def _named() -> tuple[str, str, str] | None:
    await asyncio.sleep(0)
    return logs._execution.get()


async def test_work_started_apart_from_a_call_names_none_of_its_execution():
    reads: SharedReads[tuple[str, str, str] | None] = SharedReads()
    with logs.execution_context("01-call", "demo", "echo"):
        assert await _named() == ("01-call", "demo", "echo")  # the call's own work names it
        assert await detached(_named()) is None
        assert await reads.read("figure", _named) is None


async def test_the_connections_callbacks_name_no_execution_whatever_task_calls_them(nats_url):
    """nats-py calls them from the task that met the trouble, or from its reconnecting task,
    born in whichever task's context saw the connection fail."""
    settings = with_overrides(load_settings(), nats={"urls": [nats_url]})
    nc = await connect(settings, "test-log-context")
    contexts = _Contexts()
    logger = logging.getLogger("spear.jetstream.connection")
    logger.addHandler(contexts)
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with logs.execution_context("01-call", "demo", "echo"):
            await nc._error_cb(TimeoutError("nats: timeout"))
            await nc._disconnected_cb()
            await nc._reconnected_cb()
            assert logs._execution.get() == ("01-call", "demo", "echo")  # the caller's context as it was
    finally:
        logger.removeHandler(contexts)
        logger.setLevel(before)
        await nc.close()
    said = [message for _, message, _ in contexts.seen]
    assert any("nats: timeout" in message for message in said) and "nats: reconnected" in said, said
    assert [seen for seen in contexts.seen if seen[2] is not None] == []
