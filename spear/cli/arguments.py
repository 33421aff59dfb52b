"""Command-line parsing helpers: a parser whose errors are one line, value checks that say the
rule, and the options every one-shot command takes."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, with errors in one line that names the command and where to read more."""

    def error(self, message: str) -> NoReturn:
        """Usage errors as one line and exit code 2."""
        sys.stderr.write(f"{self.prog}: {message} (see: {self.prog} --help)\n")
        sys.exit(2)


def positive(text: str) -> int:
    """An argparse type: an integer above 0."""
    return _integer(text, 1, None, "a positive integer")


def non_negative(text: str) -> int:
    """An argparse type: an integer of 0 or more."""
    return _integer(text, 0, None, "an integer >= 0")


def port(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    return _integer(text, 0, 65535, "a port number from 0 to 65535")


def port_or_any(text: str) -> int:
    """An argparse type: a TCP port, or -1 for any free port."""
    return _integer(text, -1, 65535, "a port number from 0 to 65535, or -1 for any free port")


def _integer(text: str, low: int, high: int | None, rule: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
    return value


def common_options() -> argparse.ArgumentParser:
    """`--json` and `--nats-url`, for every command that talks to a running spear."""
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON (the wire objects) instead of text")
    common.add_argument("--nats-url", help="NATS to use (comma-separated for a cluster)")
    return common
