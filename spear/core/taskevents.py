"""The task registry's events, and the registry as their fold. Pure.

Registrations and deletions are stored events (`P.tasks.<task_id>.registered|deleted` in the
registry stream), so the registry is replayable, survives restarts and is visible to any
subscriber. `Registry` is the view every gateway and worker rebuilds by replaying them.
Tags are explicit and stable, as for the execution events.
"""

from __future__ import annotations

import msgspec

from spear.core.contract import TaskInfo


class TaskEvent(msgspec.Struct, tag_field="type", kw_only=True):
    """Fields every task registry event carries."""

    task_id: str
    at: str

    @property
    def kind(self) -> str:
        """The event's tag: its `type` field and the last token of its subject."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class TaskRegistered(TaskEvent, tag="registered"):
    """A task was registered: `task` describes it whole (functions, artifact with its checksum)."""

    task: TaskInfo
    created_at: str = ""  # of the first registration of this id since its last deletion


class TaskDeleted(TaskEvent, tag="deleted"):
    """A task was deleted, with what became of its executions."""

    force: bool = False
    cancelled_executions: int = 0
    cleaned_executions: int = 0


AnyTaskEvent = TaskRegistered | TaskDeleted

_decoder: msgspec.json.Decoder[AnyTaskEvent] = msgspec.json.Decoder(AnyTaskEvent)
_encoder = msgspec.json.Encoder()


def encode_task_event(event: TaskEvent) -> bytes:
    """A registry event as stored: JSON with its `type` tag."""
    return _encoder.encode(event)


def decode_task_event(data: bytes) -> AnyTaskEvent:
    """Raises msgspec.DecodeError on anything that is not a registry event."""
    return _decoder.decode(data)


class Registry:
    """The registered tasks, folded from registry events in stream order. Applying an event again
    (or an older one of the same task) changes nothing, so replays and local applies can mix."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskInfo] = {}
        self.seqs: dict[str, int] = {}  # task id -> sequence of its newest applied event

    def apply(self, event: AnyTaskEvent, seq: int) -> bool:
        """Fold one stored event in; False if it was seen already (nothing changed)."""
        if seq <= self.seqs.get(event.task_id, 0):
            return False
        self.seqs[event.task_id] = seq
        if isinstance(event, TaskRegistered):
            self.tasks[event.task_id] = msgspec.structs.replace(
                event.task, registered=True, created_at=event.created_at or event.at, updated_at=event.at
            )
        else:
            self.tasks.pop(event.task_id, None)
        return True


def same_artifact(a: dict[str, object] | None, b: dict[str, object] | None) -> bool:
    """Whether two registrations name the same artifact: type, location, checksum, version, id
    and metadata (a process artifact's `metadata.functions` makes other functions of the same
    file; another `version` was once taken as the registered one, and dropped without a word)."""
    keys = ("artifact_type", "location", "checksum")
    if a is None or b is None or not all(a.get(k) == b.get(k) for k in keys):
        return False
    labels = ("version", "artifact_id")
    return all((a.get(k) or "") == (b.get(k) or "") for k in labels) and (a.get("metadata") or {}) == (
        b.get("metadata") or {}
    )
