"""Command-line parsing helpers: a parser whose errors are one line, value checks that say the
rule, and the options every one-shot command takes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, with errors in one line that names the command and where to read more."""

    seen: tuple[str, ...] = ()  # the arguments of the last parse
    _intermixing = False

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads; the same signature
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, remembering the arguments for `error`. A command that takes any number of
        positional values (`spear invoke TASK FN name=value …`) takes its options among them too:
        argparse alone refused `spear invoke t f --async a=1` ("unrecognized arguments: a=1")."""
        if self._intermixing:  # (parse_known_intermixed_args calls back here, twice)
            return super().parse_known_args(args, namespace)
        seen = list(sys.argv[1:] if args is None else args)
        self.seen = tuple(seen[: seen.index("--")] if "--" in seen else seen)  # after `--`: values
        if not self._takes_values_among_options():
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def _takes_values_among_options(self) -> bool:
        nargs = [action.nargs for action in self._get_positional_actions()]
        return any(n in ("*", "+") for n in nargs) and not any(
            n in (argparse.PARSER, argparse.REMAINDER) for n in nargs
        )

    def error(self, message: str) -> NoReturn:
        """Usage errors as one line and exit code 2. An unknown option is named first: argparse
        would report the required arguments it then failed to find (`spear invoke --bogus`)."""
        unknown = [arg for arg in self.seen if self._unknown_option(arg)]
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        sys.stderr.write(f"{self.prog}: {message} (see: {self.prog} --help)\n")
        sys.exit(2)

    def _unknown_option(self, arg: str) -> bool:
        if not arg.startswith("-") or arg == "-" or self._negative_number_matcher.match(arg):
            return False
        return arg.split("=", 1)[0] not in self._option_string_actions


def positive(text: str) -> int:
    """An argparse type: an integer above 0."""
    return _integer(text, 1, None, "a positive integer")


def non_negative(text: str) -> int:
    """An argparse type: an integer of 0 or more."""
    return _integer(text, 0, None, "an integer >= 0")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free port, the one taken is said)."""
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
