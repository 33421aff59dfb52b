"""`spear COMMAND --help` explains every option: a new user reads it before anything else."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from spear.cli.main import build_parser, main
from spear.worker.loading import TaskSpecError, load_task


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
    section = readme.split("## The command line", 1)[1].split("\n\n## ", 1)[0]
    table = section.split("\n\n| command", 1)[1].split("\n\n", 1)[0]  # the first table
    named = set(re.findall(r"`spear ([a-z][a-z-]*)", table))
    commands = _subcommands(build_parser())
    assert {"invoke", "status", "watch", "cancel", "executions", "tasks", "workers"} <= named
    without = [name for name in sorted(named) if "--json" not in commands[name]._option_string_actions]
    assert not without, without


def test_every_command_is_in_the_readme_tables():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The command line", 1)[1].split("\n\n## ", 1)[0]
    named = set(re.findall(r"`spear ([a-z][a-z-]*)", section))
    assert sorted({name.split()[0] for name in _subcommands(build_parser())} - named) == []


@pytest.mark.parametrize(
    "argv, said",
    [
        (["invoke", "--bogus"], "spear invoke: unrecognized arguments: --bogus"),
        (["invoke", "--bogus=1", "demo"], "spear invoke: unrecognized arguments: --bogus=1"),
        (["invoke"], "spear invoke: the following arguments are required: task_id"),
    ],
)
def test_an_unknown_option_is_named_before_missing_arguments(argv, said, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and capsys.readouterr().err.startswith(said)


def test_a_task_spec_naming_something_else_says_what_it_found(tmp_path, monkeypatch):
    (tmp_path / "notask.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskSpecError, match=r"^task 'notask:x': notask\.x is an int \(1\), not a spear\.Task"):
        load_task("notask:x")


@pytest.mark.parametrize(
    "argv",
    [
        ["invoke", "demo", "echo", "--async", "value=1", "b=2", "--json"],
        ["invoke", "demo", "echo", "value=1", "--json", "b=2", "--async"],
        ["invoke", "--json", "--async", "demo", "echo", "value=1", "b=2"],
    ],
)
def test_options_may_come_among_name_value_arguments(argv):
    """A probe: `spear invoke t f --async a=1` was refused ("unrecognized arguments: a=1"),
    though the same options worked at the end of the line or before the task."""
    parsed = build_parser().parse_args(argv)
    assert (parsed.task_id, parsed.function_name, parsed.parameters) == ("demo", "echo", ["value=1", "b=2"])
    assert parsed.json and parsed.use_async


def test_name_value_arguments_are_strict_json_else_strings():
    from spear.cli.commands import UsageError, parse_parameters

    parsed = parse_parameters(
        ["n=30", 'tags=["a"]', "name=ann", "f=NaN", "g=Infinity", "x=1.5", "big=123456789012345678901"]
    )
    assert parsed == {
        "n": 30,
        "tags": ["a"],
        "name": "ann",
        "f": "NaN",  # not JSON: a string (Python's json made a float no request could carry)
        "g": "Infinity",
        "x": 1.5,
        "big": 123456789012345678901,
    }
    with pytest.raises(UsageError, match="'e': 1e400 is a number out of range"):
        parse_parameters(["e=1e400"])


@pytest.mark.parametrize(
    ("declared", "is_text"),
    [
        ("str", True),
        ("str | None", True),
        ("Optional[str]", True),
        ("typing.Optional[str]", True),
        ("Union[str, None]", True),
        ("Annotated[str, Meta(max_length=5)]", True),
        ("int", False),
        ("list[str]", False),
        ("Literal['a']", False),
        ("strange", False),
    ],
)
def test_the_types_whose_values_the_command_line_sends_as_text(declared, is_text):
    """review53: `Union[str, None]` or `Annotated[str, …]` under string annotations got `42` as a number."""
    from spear.cli.commands import TEXT_TYPE

    assert bool(TEXT_TYPE.fullmatch(declared)) is is_text


@pytest.mark.parametrize(
    ("value", "declared", "as_text"),
    [
        (42, "str", True),
        (None, "str", True),  # (probe66: sent as null, refused)
        (None, "Annotated[str, Meta(max_length=5)]", True),
        (None, "str | None", False),  # the function takes None
        (None, "Optional[str]", False),
        (42, "Optional[str]", True),
        ("x", "str", False),  # text already
        (None, "int", False),
    ],
)
def test_which_command_line_values_go_as_their_text(value, declared, as_text):
    from spear.cli.commands import sent_as_text

    assert sent_as_text(value, declared) is as_text
