"""`spear`: the parser and the dispatch. Long-running commands live in run.py, one-shot commands
in commands.py, how results are shown in output.py, how configuration is read in settings.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from spear.cli import commands, run
from spear.cli.settings import settings_from
from spear.core.config import ConfigError
from spear.jetstream.connection import CredentialsRefused


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spear", description="event-sourced function invocation on NATS JetStream")
    parser.add_argument("--config", help="spear.toml to read (default ./spear.toml if present)")
    parser.add_argument("--log-level", default=os.environ.get("SPEAR_LOG_LEVEL", "INFO"))
    subcommands = parser.add_subparsers(dest="command", required=True)
    run.add_parsers(subcommands)
    commands.add_parsers(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"spear: {exc}", file=sys.stderr)
        return 2
    coroutine = run.command(settings, args) or commands.command(settings, args)
    if coroutine is None:
        return 2
    return _run(coroutine)


def _run(coroutine: Coroutine[Any, Any, int | None]) -> int:
    runner: Callable[[Coroutine[Any, Any, int | None]], int | None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(coroutine) or 0
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 0  # stopped during start-up, on request
    except (CredentialsRefused, ConfigError) as exc:  # waiting or retrying would not help
        print(f"spear: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
