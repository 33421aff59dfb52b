"""`spear`: the parser, the dispatch, and how every failure becomes one line and an exit code.
Long-running commands live in run.py, one-shot commands in commands.py, how things are shown in
output.py, exit codes in outcomes.py, how configuration is read in settings.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from spear import __version__, errors
from spear.cli import bench, commands, outcomes, run
from spear.cli.arguments import Parser, common_options, positive
from spear.cli.commands import Session, UsageError
from spear.cli.lifelines import DataDirInUse, DataDirUnusable
from spear.cli.output import plain, show_json
from spear.cli.ports import PortInUse
from spear.cli.settings import log_format, log_level, settings_from
from spear.core.config import ConfigError
from spear.jetstream.connection import CredentialsRefused
from spear.jetstream.topology import StartUpFailed
from spear.telemetry.logs import setup_logging

# Options of every command, taken before the command's name or after it (`spear up --config F`,
# as CONTRACT §6 writes it, and `spear --config F up`).
GLOBAL_OPTIONS = (
    ("--config", "spear.toml to read (default: $SPEAR_CONFIG, else ./spear.toml if present)"),
    ("--log-level", "DEBUG, INFO, WARNING or ERROR (default: $SPEAR_LOG_LEVEL, else INFO)"),
    (
        "--log-format",
        "text, or json: lines with execution id, task, function, trace id (default: $SPEAR_LOG_FORMAT, else text)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = Parser(prog="spear", description="event-sourced function invocation on NATS JetStream")
    parser.add_argument("--version", action="version", version=f"spear {__version__}")
    for name, text in GLOBAL_OPTIONS:
        parser.add_argument(name, help=text)
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parsers(subcommands)
    bench.add_parser(subcommands)
    commands.add_parsers(subcommands, common_options(), positive)
    _take_global_options(parser)
    return parser


def _take_global_options(parser: argparse.ArgumentParser) -> None:
    """Every subcommand (and theirs) takes the global options too; given there, they win. Their
    default is no value at all, so one given before the command is not overwritten."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                for name, text in GLOBAL_OPTIONS:
                    if name not in sub._option_string_actions:
                        sub.add_argument(name, help=text, default=argparse.SUPPRESS)
                _take_global_options(sub)


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names; its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return outcomes.USAGE
    session = Session(json=getattr(args, "json", False))
    try:
        level, form = log_level(args), log_format(args)
        setup_logging(level, form)
        # Child processes (spear up's workers) log the same way.
        os.environ["SPEAR_LOG_LEVEL"], os.environ["SPEAR_LOG_FORMAT"] = logging.getLevelName(level), form
        settings = settings_from(args)
        coroutine = (
            run.command(settings, args) or bench.command(settings, args) or commands.command(settings, args, session)
        )
        if coroutine is None:
            return outcomes.USAGE
        return _run(coroutine)
    except (ConfigError, UsageError, PortInUse, CredentialsRefused, DataDirInUse, DataDirUnusable) as exc:
        return _fail(session, str(exc), outcomes.USAGE)
    except errors.SpearError as exc:
        return _report(session, exc)
    except StartUpFailed as exc:  # (the NATS cannot hold spear's streams: no JetStream, too few peers)
        return _fail(session, str(exc), outcomes.UNAVAILABLE)
    except KeyboardInterrupt:
        follow = f": execution {session.execution_id} goes on (spear watch {session.execution_id})"
        return _fail(session, "interrupted" + (follow if session.execution_id else ""), outcomes.INTERRUPTED)
    except BrokenPipeError:
        # The reader left (`spear executions | head -1`): nothing more to say, and nobody to say it to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE


# Refusals: the request was turned down before anything was stored, so the id the CLI made up for
# it names no execution (`spear watch` on it would only say "not found").
REFUSED = (
    errors.InvalidArgument,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.NotFound,
    errors.PayloadTooLarge,
    errors.ResourceExhausted,
    errors.NoGateway,  # (nothing received it: probe39)
)


def _report(session: Session, error: errors.SpearError) -> int:
    """One line naming what went wrong and, when an execution is concerned, its id to follow."""
    execution_id = error.execution_id or ("" if isinstance(error, REFUSED) else session.execution_id)
    if isinstance(error, errors.DeadlineExceeded) and execution_id:
        # (the server's message says already that it goes on: probe39 saw it said twice)
        line = f"{error.message} · follow it: spear watch {execution_id}"
    elif isinstance(error, errors.ExecutionError) or not execution_id or execution_id in error.message:
        line = error.message
    else:
        line = f"{error.message} · execution {execution_id}"
    document = {"success": False, "error_code": error.code, "message": error.message, "execution_id": execution_id}
    if isinstance(error, errors.FailedPrecondition) and error.final_status:
        document["final_status"] = error.final_status
    # --json prints the wire objects: the server's own reply where one said so, else this one
    return _fail(session, line, outcomes.for_error(error), error.reply or document)


def _fail(session: Session, line: str, code: int, document: dict[str, Any] | None = None) -> int:
    print(plain(f"spear: {line}"), file=sys.stderr, flush=True)  # (the server's words: output.plain)
    if session.json and document is not None:
        show_json(document)
    return code


def _run(coroutine: Coroutine[Any, Any, int | None]) -> int:
    runner: Callable[[Coroutine[Any, Any, int | None]], int | None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    interrupted = asyncio.Event()
    try:
        code = runner(_interruptible(coroutine, interrupted)) or 0
    except asyncio.CancelledError:
        if interrupted.is_set():
            raise KeyboardInterrupt from None
        return 0  # a long-running command stopped during start-up, on request
    if interrupted.is_set():
        raise KeyboardInterrupt  # the command ended anyway, but the user had asked it to stop
    return code


async def _interruptible(coroutine: Coroutine[Any, Any, int | None], interrupted: asyncio.Event) -> int | None:
    """Ctrl-C cancels a one-shot command, and keeps cancelling it until it ends: on Python 3.11 a
    cancellation that meets a result (asyncio.wait_for, nats-py's requests) can be lost, and the
    command would go on as if nothing had been asked. (Long-running commands install their own
    handler: run.Lifetime.)"""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def cancel_until_done() -> None:
        if task is not None and not task.done():
            task.cancel()
            loop.call_later(0.2, cancel_until_done)

    def on_interrupt() -> None:
        interrupted.set()
        cancel_until_done()

    if threading.current_thread() is not threading.main_thread():  # (run by a test, say)
        return await coroutine
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await coroutine
    finally:
        loop.remove_signal_handler(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
