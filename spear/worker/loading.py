"""Find the tasks a worker serves from specs like `pkg.module:attr` (as uvicorn and `celery -A` do).

The current directory is importable. A spec that does not import, names nothing, or names
something other than a `spear.Task` raises TaskSpecError with one line naming the spec and the
reason, which the CLI prints before exiting (no traceback: the user's code is not spear's bug).
"""

from __future__ import annotations

import importlib
import os
import sys

from spear.core.config import ConfigError
from spear.worker.tasks import Task


class TaskSpecError(ConfigError):
    """A `--task` spec that cannot be served: a configuration error (the CLI prints it, exit code 2)."""


def load_task(spec: str) -> Task:
    """The spear.Task a spec `pkg.module:attr` names; one-line errors otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskSpecError(f"task {spec!r}: expected pkg.module:attr (a module path, a colon, a spear.Task's name)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):  # not an inner import
            raise TaskSpecError(f"task {spec!r}: no module named {exc.name!r} (from {cwd})") from None
        raise TaskSpecError(f"task {spec!r}: importing {module_name} failed: {_describe(exc)}") from None
    except BaseException as exc:  # whatever the module's code raised while importing, SystemExit too
        raise TaskSpecError(f"task {spec!r}: importing {module_name} failed: {_describe(exc)}") from None
    value: object = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TaskSpecError(f"task {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not isinstance(value, Task):
        kind = type(value).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise TaskSpecError(
            f"task {spec!r}: {module_name}.{attr} is {article} {kind} ({shown}), not a spear.Task"
            " (make one with spear.Task(...) and name it after the colon)"
        )
    return value


def load_tasks(specs: list[str], demo: bool = True, registered: bool = False) -> list[Task]:
    """The tasks of `specs`, plus the bundled demo unless `demo` is false; a task id served twice
    is an error, and so is none at all unless tasks registered at run time are served
    (`registered`: probe39, a server for registered tasks alone could not start)."""
    tasks: list[Task] = []
    if demo:
        from spear.demo import demo as demo_task

        tasks.append(demo_task)
    for spec in specs:
        task = load_task(spec)
        if any(other is task for other in tasks):
            continue  # the same task named twice
        if any(other.task_id == task.task_id for other in tasks):
            raise TaskSpecError(f"task {spec!r}: task id {task.task_id!r} is already served by another task")
        tasks.append(task)
    if not tasks and not registered:
        raise TaskSpecError(
            "no task to serve: give --task pkg.module:attr, leave [worker] demo on, or serve tasks registered "
            "at run time ([tasks] allow_registration, [worker] serve_registered)"
        )
    return tasks


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
