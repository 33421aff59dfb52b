"""`spear COMMAND --help` explains every option: a new user reads it before anything else."""

from __future__ import annotations

import argparse

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
