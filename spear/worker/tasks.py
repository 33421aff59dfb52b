"""A task: a named set of Python functions a worker serves, and its public description.

`TaskDefinition` is what code registers; its `TaskInfo` (contract) is what is published to the
task registry bucket, so gateways check task and function names without importing the code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spear.core.contract import FunctionInfo, TaskInfo


@dataclass
class TaskDefinition:
    task_id: str
    name: str = ""
    description: str = ""
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    module: str = ""  # where the code lives, reported as the task's artifact

    def function(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: register `fn` under its own name."""
        self.functions[fn.__name__] = fn
        return fn

    def info(self) -> TaskInfo:
        return TaskInfo(
            task_id=self.task_id,
            task_name=self.name or self.task_id,
            description=self.description,
            artifact_spec={"artifact_type": "python", "location": self.module},
            functions=[_describe(name, fn) for name, fn in sorted(self.functions.items())],
        )


def _describe(name: str, fn: Callable[..., Any]) -> FunctionInfo:
    params = [p for p in inspect.signature(fn).parameters if p != "ctx"]
    doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
    streaming = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
    return FunctionInfo(name=name, parameters=params, description=doc, streaming=streaming)
