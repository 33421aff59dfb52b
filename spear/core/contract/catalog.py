"""What the service knows of tasks and workers, as the replies describe them: functions, parameters,
instances, tasks and workers."""

from __future__ import annotations

from typing import Any

import msgspec


class ParameterInfo(msgspec.Struct):
    """One parameter a function takes by name (shaped like SPEAR's FunctionParameter)."""

    name: str
    type: str = ""  # the annotation's text, for people (the worker takes a call's values at that type)
    required: bool = True


class FunctionInfo(msgspec.Struct):
    """A function as workers publish it: what the gateway checks a call against."""

    name: str
    parameters: list[ParameterInfo] = []
    accepts_any: bool = False  # takes **kwargs: any parameter name is accepted
    # its `**` parameter's own name, for messages (probe66: `**rest` was said `**kwargs`); "" from a
    # worker older than it, and for a process artifact's function, said `**kwargs`
    var_keyword: str = ""
    description: str = ""
    streaming: bool = False  # a generator: its items are `chunk` events
    timeout_ms: int = 0  # the function's default time limit (0: the execution mode's)
    max_retries: int | None = None  # the function's default retries (None: the execution mode's)
    context_parameter: str = ""  # where it takes its spear.Context: no call may name a parameter so

    def call_form(self) -> str:
        """How it is called, for messages: `add(a, b=…, **kwargs)` (names only: a default's value
        may be a secret or megabytes, probe52)."""
        takes = [p.name if p.required else f"{p.name}=…" for p in self.parameters]
        return f"{self.name}({', '.join([*takes, self.any_names()] if self.accepts_any else takes)})"

    def any_names(self) -> str:
        """Its `**` parameter as the function names it (`**rest`)."""
        return f"**{self.var_keyword or 'kwargs'}"


class InstanceInfo(msgspec.Struct):
    """A live task instance in a worker: the loaded module, or the verified artifact of a process task."""

    instance_id: str
    worker_id: str = ""
    created_at: str | None = None
    last_used_at: str | None = None
    calls: int = 0


class TaskInfo(msgspec.Struct):
    """SPEAR's TaskInfo, plus the functions the task serves, and (get_task) who serves it."""

    task_id: str
    task_name: str = ""
    artifact_spec: dict[str, Any] | None = None
    created_at: str | None = None
    updated_at: str | None = None
    execution_count: int = 0  # (ListTasks: with include_details only)
    last_status: str = "EXECUTION_STATUS_UNKNOWN"  # of its newest execution; none (or not asked for): UNKNOWN
    metadata: dict[str, str] = {}
    description: str = ""
    functions: list[FunctionInfo] = []
    registered: bool = False  # registered at runtime (register_task, NEW_TASK), not served from code
    workers: list[str] = []  # get_task: the workers serving it now
    instances: list[InstanceInfo] = []  # get_task: its live instances

    def has_function(self, name: str) -> bool:
        """Whether the task serves a function of that name."""
        return any(f.name == name for f in self.functions)


class WorkerInfo(msgspec.Struct):
    """One running worker: its id, tasks and the executions it runs."""

    worker_id: str
    tasks: list[str] = []  # the tasks it serves
    version: str = ""
    instance_id: str = ""  # its NATS micro service instance
    running_executions: list[str] = []  # ids of the executions whose latest attempt it runs
