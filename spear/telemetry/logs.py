"""Log lines, as text or as JSON lines (`--log-format json` / `SPEAR_LOG_FORMAT=json`), carrying
the execution id, task, function and trace id of the work being done where known.

Those come from context variables: a request handler or a worker sets them once
(`execution_context`) and every log call in that task, and in the function's thread, sees them.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar, Token

_execution: ContextVar[tuple[str, str, str] | None] = ContextVar("spear_execution", default=None)

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class execution_context:  # (named as the function it replaces: `with execution_context(...)`)
    """Log records within name this execution (task, function, id). A class, not a generator:
    the quick accept of an ASYNC call enters one per call (~3 µs less)."""

    __slots__ = ("_token", "_value")

    def __init__(self, execution_id: str, task_id: str, function_name: str) -> None:
        self._value = (execution_id, task_id, function_name)
        self._token: Token[tuple[str, str, str] | None] | None = None

    def __enter__(self) -> None:
        self._token = _execution.set(self._value)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _execution.reset(self._token)


class no_execution:
    """Log records within name no execution, whatever the context they are made in: what
    concerns a connection (nats-py calls its callbacks from the task that met the trouble, or
    from its reconnecting task, born in whichever task's context saw the connection fail:
    probe67 saw a lost server logged under an execution that had ended 90 s before)."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _execution.set(None)

    def __exit__(self, *exc: object) -> None:
        _execution.reset(self._token)


def set_execution(execution_id: str, task_id: str, function_name: str) -> None:
    """For the rest of the current task (each request and invocation runs in its own task)."""
    _execution.set((execution_id, task_id, function_name))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the execution fields known."""

    def format(self, record: logging.LogRecord) -> str:
        """A record as one JSON line, with the execution it concerns."""
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        execution = _execution.get()
        if execution is not None:
            line["execution_id"], line["task_id"], line["function_name"] = execution
        from spear.telemetry.tracing import current_ids  # only JSON lines need the SDK

        trace_id, span_id = current_ids()
        if trace_id:
            line["trace_id"], line["span_id"] = trace_id, span_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def announce(message: str, log_format: str, **fields: object) -> None:
    """A line for whoever started the command, on stdout: `message` as it is, or in JSON mode one
    JSON object as the log lines are (with `fields`), so a collector reading JSON lines takes it
    too (probe54: `spear up --log-format json` printed its ready line as plain text)."""
    if log_format != "json":
        print(message, flush=True)
        return
    record = logging.LogRecord("spear", logging.INFO, __file__, 0, message, None, None)
    line = json.loads(JsonFormatter().format(record))
    print(json.dumps({**line, **fields}, default=str), flush=True)


def setup_logging(level: int | str, log_format: str) -> None:
    """Configure the root logger once for a spear command (`log_format`: one of FORMATS)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_not_tls_eof_noise)
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler], force=True)


def _not_tls_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio warns "returning true from eof_received() has no effect when using ssl" whenever a
    TLS connection to NATS ends from the server's side (every CLI command over TLS): nats-py's
    stream protocol asks to keep a half-closed transport, which TLS cannot do. Nothing is lost."""
    return not (record.name == "asyncio" and record.getMessage().startswith("returning true from eof_received()"))
