"""The requests of the wire contract (CONTRACT.md), one Struct an operation, with the parts they share.

Request fields that take an enum are strings (or proto numbers) parsed by `WireEnum.parse_input`
(full name or suffix, any case; zero: not set); the schema lists the full names, and the enums
are components of the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from spear.core.contract.identifiers import Id, OptionalId
from spear.core.enums import ExecutionMode, ExecutionStatus, InvocationType, WireEnum


def _enum_input(enum: type[WireEnum]) -> msgspec.Meta:
    return msgspec.Meta(
        description=(
            f"{enum.__name__}: the full name or its suffix, any case, or its number in SPEAR's "
            "function.proto; 0 or the *_UNKNOWN name is proto3's 'not set' (the default)"
        ),
        examples=[m.value for m in enum],
    )


ModeInput = Annotated[str | int, _enum_input(ExecutionMode)]
InvocationTypeInput = Annotated[str | int, _enum_input(InvocationType)]
StatusInput = Annotated[str | int, _enum_input(ExecutionStatus)]


# A zero where a count is asked for is proto3's "not set" (a Go or protobuf client sends it for
# a field it never set): it means the default, as an absent field does.
PAGE_DEFAULT = 100
TASK_EXECUTIONS_DEFAULT = 10


class Parameter(msgspec.Struct, forbid_unknown_fields=True):
    """SPEAR's FunctionParameter: `type`, `required` and `description` are accepted (a client
    built from the proto sends them) and not used; the function's signature decides."""

    name: str
    value: Any = None
    type: str = ""
    required: bool = False
    description: str = ""


class ExecutionContext(msgspec.Struct, forbid_unknown_fields=True):
    """The invocation's context: its time limit, retries and caller metadata."""

    execution_id: str = ""  # SPEAR's context field; the request's own execution_id takes precedence
    timeout_ms: int = 0
    max_retries: int | None = None
    session_id: str = ""
    user_id: str = ""
    environment: dict[str, str] = {}
    headers: dict[str, str] = {}


ARTIFACT_TYPES = ("python", "process")


class ArtifactSpec(msgspec.Struct, forbid_unknown_fields=True):
    """SPEAR's ArtifactSpec (CONTRACT §8): what a registered task runs."""

    artifact_type: Literal["python", "process"]
    location: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    artifact_id: Annotated[str, msgspec.Meta(max_length=256)] = ""  # SPEAR's label for it: kept, not used
    checksum: str = ""  # "sha256:<hex>" or bare hex; empty: the server records the file's
    version: str = ""
    metadata: dict[str, str] = {}


class InvokeFunctionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """InvokeFunction (and StreamFunction): which function, with what, how."""

    task_id: Id = ""  # required for EXISTING_TASK: checked by validate_id (defaults are not)
    function_name: Id = ""
    invocation_type: InvocationTypeInput = InvocationType.EXISTING_TASK.value
    parameters: list[Parameter] = []
    execution_mode: ModeInput = ExecutionMode.SYNC.value
    context: ExecutionContext = msgspec.field(default_factory=ExecutionContext)
    execution_id: Id | None = None
    invocation_metadata: dict[str, str] = {}
    force_new_instance: bool = False
    create_if_not_exists: bool = False
    task_name: str = ""
    task_description: str = ""
    artifact_spec: ArtifactSpec | None = None  # NEW_TASK, or create_if_not_exists
    wait: bool = False  # SPEAR's field; the execution mode decides whether the reply waits


EVENTS_PAGE_MAX = 1000  # events in one GetExecutionEvents reply


class GetExecutionStatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetExecutionStatus: which execution, with its result and logs or not."""

    execution_id: Id = ""
    include_result: bool = True
    include_logs: bool = False


class GetExecutionEventsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """spear's extension (`P.api.get_execution_events`): an execution's stored events after a
    stream sequence, a page at a time (the NATS twin of `GET /api/v1/executions/{id}/events`)."""

    execution_id: Id = ""
    after_seq: Annotated[int, msgspec.Meta(ge=0)] = 0  # events stored after this stream sequence
    limit: Annotated[int, msgspec.Meta(ge=0, le=EVENTS_PAGE_MAX)] = 0  # 0: EVENTS_PAGE_MAX


class CancelExecutionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """CancelExecution: which execution, why, and whether to wait for it."""

    execution_id: Id = ""
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    force: bool = False


class ListExecutionsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """ListExecutions: filters and a page."""

    task_id: OptionalId = ""
    limit: Annotated[int, msgspec.Meta(ge=0, le=1000)] = PAGE_DEFAULT  # 0 (proto3's "not set"): the default
    start_after: OptionalId = ""  # the page starts after this id, in the listing's order
    status_filter: StatusInput = ""
    function_name: OptionalId = ""  # spear's extension: only this function's executions
    order: Literal["desc", "asc"] = "desc"  # spear's extension: newest (last accepted) first by default

    def __post_init__(self) -> None:
        self.limit = self.limit or PAGE_DEFAULT


class RegisterTaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """RegisterTask: the task's id (or none: the server makes one), name and artifact."""

    task_id: OptionalId = ""  # empty: the server makes one
    task_name: str = ""
    description: str = ""
    artifact_spec: ArtifactSpec | None = None
    metadata: dict[str, str] = {}


class DeleteTaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """DeleteTask: which task, and what becomes of its executions."""

    task_id: Id = ""
    force: bool = False  # cancel its pending and running executions
    cleanup_executions: bool = False  # remove their history too (expired markers stay)


class GetTaskRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetTask: which task, with its newest executions or not."""

    task_id: Id = ""
    include_executions: bool = False
    execution_limit: Annotated[int, msgspec.Meta(ge=0, le=1000)] = TASK_EXECUTIONS_DEFAULT  # 0: the default

    def __post_init__(self) -> None:
        self.execution_limit = self.execution_limit or TASK_EXECUTIONS_DEFAULT


class ListTasksRequest(msgspec.Struct, forbid_unknown_fields=True):
    """ListTasks: a prefix and a page."""

    prefix: OptionalId = ""
    limit: Annotated[int, msgspec.Meta(ge=0, le=1000)] = PAGE_DEFAULT  # 0 (proto3's "not set"): the default
    start_after: OptionalId = ""
    include_details: bool = False

    def __post_init__(self) -> None:
        self.limit = self.limit or PAGE_DEFAULT


class GetHealthRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetHealth: with execution counts or not."""

    include_details: bool = False


class GetStatsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """GetStats: which parts, over which time range."""

    include_task_stats: bool = True
    include_execution_stats: bool = True
    time_range_hours: Annotated[int, msgspec.Meta(ge=0)] = 0


class ListWorkersRequest(msgspec.Struct, forbid_unknown_fields=True):
    """spear's extension (`P.api.list_workers`, `GET /api/v1/workers`): the running workers."""

    task_id: OptionalId = ""  # only workers serving this task
