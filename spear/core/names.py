"""Every subject, stream, consumer and bucket name, built in one place from the prefix. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from spear.core.events import TERMINAL_KINDS

# Every operation of CONTRACT §3, served at `P.api.<operation>`; `Names.api` refuses any other.
API_OPERATIONS = (
    "invoke_function",
    "get_execution_status",
    "cancel_execution",
    "stream_function",
    "list_executions",
    "register_task",
    "get_task",
    "list_tasks",
    "delete_task",
    "get_health",
    "get_stats",
    "list_workers",  # spear's extension (docs/design.md)
    "get_execution_events",  # spear's extension: events through the gateway, redacted (docs/design.md)
)


# A header on the events of an attempt a gateway ran itself (an inline function called SYNC,
# `spear.service.inline`): the worker that receives its `requested` reads what follows it first.
RAN_INLINE_HEADER = "Spear-Ran-Inline"


@dataclass(frozen=True)
class Names:
    """Every subject, stream, bucket, consumer and service name of one prefix."""

    prefix: str = "spear"

    # --- the event log ---
    @property
    def stream(self) -> str:
        """The executions stream (`P` upper-cased + `_EXECUTIONS`)."""
        return f"{self.prefix.upper()}_EXECUTIONS"

    def append(self, task_id: str, execution_id: str, kind: str) -> str:
        """Where writers publish. The stream stores it as `event(...)` (subject transform)."""
        return f"{self.prefix}.append.{task_id}.{execution_id}.{kind}"

    def event(self, task_id: str, execution_id: str, kind: str) -> str:
        """Where the event is stored and re-published once stored."""
        return f"{self.prefix}.exec.{task_id}.{execution_id}.{kind}"

    def execution_events(self, execution_id: str) -> str:
        """Every event of one execution, whatever its task (ids are unique across tasks)."""
        return f"{self.prefix}.exec.*.{execution_id}.*"

    def terminal_events(self) -> list[str]:
        """Subjects of every execution's terminal events, one per kind."""
        return [f"{self.prefix}.exec.*.*.{kind}" for kind in TERMINAL_KINDS]

    # --- the task registry's events (registered, deleted) ---
    @property
    def registry_stream(self) -> str:
        """The stream of task registry events."""
        return f"{self.prefix.upper()}_REGISTRY"

    def task_append(self, task_id: str, kind: str) -> str:
        """Where the registry's writer publishes; the stream stores it as `task_event(...)`."""
        return f"{self.prefix}.append_task.{task_id}.{kind}"

    def task_event(self, task_id: str, kind: str) -> str:
        """The stored subject of one task's registry event of a kind."""
        return f"{self.prefix}.tasks.{task_id}.{kind}"

    def task_events(self, task_id: str = "*") -> str:
        """Every registry event of one task (or, with `*`, of every task)."""
        return f"{self.prefix}.tasks.{task_id}.*"

    @property
    def worker_tasks(self) -> str:
        """Each worker answers here with what it serves now (tasks and live instances)."""
        return f"{self.prefix}.worker.tasks"

    @property
    def worker_functions(self) -> str:
        """Each worker answers here with the functions of its code tasks, while it takes their
        invocations (a worker lacking one asks: spear/worker/elsewhere.py)."""
        return f"{self.prefix}.worker.functions"

    # --- consumers ---
    def worker_consumer(self, task_id: str) -> str:
        """The durable pull consumer the workers of a task share."""
        return f"worker-{task_id}"

    projection_consumer = "projection"

    # --- read models ---
    @property
    def state_bucket(self) -> str:
        """The KV bucket of execution states (the projection's)."""
        return f"{self.prefix.upper()}_STATE"

    @property
    def tasks_bucket(self) -> str:
        """The KV bucket of registered tasks."""
        return f"{self.prefix.upper()}_TASKS"

    @staticmethod
    def state_key(execution_id: str) -> str:
        """An execution's key in the state bucket."""
        return f"exec.{execution_id}"

    @staticmethod
    def expired_key(execution_id: str) -> str:
        """The key of an expired execution's marker in the state bucket."""
        return f"expired.{execution_id}"

    @staticmethod
    def function_stats_key(task_id: str, function_name: str) -> str:
        """The key of a function's recent times in the state bucket."""
        return f"fn.{task_id}.{function_name}"

    @staticmethod
    def tally_key(hours: int) -> str:
        """Where the state bucket keeps a slow statistics scan's answer for the window of the
        last `hours` (0: all), for gateways that start later (service/views.py, TallyCache)."""
        return f"tally.{hours}"

    @staticmethod
    def every_tally_key() -> str:
        """Every kept statistics answer (`tally_key`), for a rebuild to drop."""
        return "tally.>"

    @staticmethod
    def every_function_stats_key() -> str:
        """The keys of every function's recent times in the state bucket (a wildcard)."""
        return "fn.>"

    # --- request-reply API ---
    def api(self, operation: str) -> str:
        """The NATS subject of an API operation; ValueError for an unknown one."""
        if operation not in API_OPERATIONS:
            raise ValueError(f"{operation!r} is not an operation of the API")
        return f"{self.prefix}.api.{operation}"

    # --- NATS micro services: named after the prefix, so deployments sharing a NATS (one prefix
    # each) count only their own components; the default prefix gives `spear` (CONTRACT §3). ---
    @property
    def service_name(self) -> str:
        """The gateway's NATS micro service name (the prefix)."""
        return self.prefix

    @property
    def worker_service_name(self) -> str:
        """The workers' NATS micro service name."""
        return f"{self.prefix}-worker"

    @property
    def projection_service_name(self) -> str:
        """The projections' NATS micro service name."""
        return f"{self.prefix}-projection"

    @property
    def projection_status(self) -> str:
        """Where projections answer health's question about their progress."""
        return f"{self.prefix}.projection.status"

    @staticmethod
    def event_execution_id(subject: str) -> str:
        """The execution id token of an event subject."""
        return subject.split(".")[-2]
