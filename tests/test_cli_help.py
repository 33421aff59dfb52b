"""`spear COMMAND --help` explains every option: a new user reads it before anything else."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from spear.cli.main import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {n}": p for n, p in _subcommands(sub).items()})
    return found


def test_every_option_of_every_command_says_what_it_does():
    commands = _subcommands(build_parser())
    assert {"up", "worker", "gateway", "projection", "api", "invoke"} <= set(commands)
    silent = [
        f"spear {name} {action.option_strings[-1]}"
        for name, sub in commands.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert not silent, silent


def test_every_command_of_the_readme_table_takes_json():
    """README: "`--json` prints the wire objects instead (every command of the table below takes it)"."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## The command line", 1)[1].split("\n\n## ", 1)[0]
    named = set(re.findall(r"`spear ([a-z][a-z-]*)", table))
    commands = _subcommands(build_parser())
    assert {"invoke", "status", "watch", "cancel", "executions", "tasks", "workers"} <= named
    without = [name for name in sorted(named) if "--json" not in commands[name]._option_string_actions]
    assert not without, without
