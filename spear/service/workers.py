"""Which workers run, and what: every worker process is an instance of the NATS micro service
`P-worker` (P the subject prefix), whose `$SRV.INFO` reply names its worker id and tasks in its
metadata. One request on `$SRV.INFO.P-worker` gathers every instance's reply; what each one
serves and runs now comes from its answer on `P.worker.tasks` (a scan of every execution state
found the running ones before: O(executions retained) per listing, polled every 3 s by the web view).
"""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from spear.core.contract import InstanceInfo, ListWorkersRequest, ListWorkersResponse, WorkerInfo
from spear.jetstream import scatter

GATHER_S = 1.0  # the most a listing waits for replies
QUIET_S = 0.2  # after a reply, how long to wait for another one before the listing is complete


class ServiceInfo(msgspec.Struct):
    """The part of a NATS micro `$SRV.INFO` reply that is read here."""

    id: str = ""
    version: str = ""
    metadata: dict[str, str] = {}

    @property
    def worker_id(self) -> str:
        """The worker's id, as its metadata names it (else its micro instance's)."""
        return self.metadata.get("worker_id") or self.id


def service_infos(replies: list[bytes]) -> list[ServiceInfo]:
    """The `$SRV.INFO` replies that are a micro service's INFO (anything else is ignored)."""
    infos = []
    for reply in replies:
        try:
            infos.append(msgspec.json.decode(reply, type=ServiceInfo))
        except msgspec.DecodeError:
            continue
    return infos


async def gather(nc: Client, subject: str, window_s: float = GATHER_S, quiet_s: float = QUIET_S) -> list[bytes]:
    """Every reply to one request on `subject`: all that arrive within `window_s`, ending early
    once no further reply comes for `quiet_s` (or at once when nothing listens)."""
    return [reply async for reply in scatter.replies(nc, subject, window_s, quiet_s)]


def workers(
    infos: list[ServiceInfo],
    request: ListWorkersRequest,
    serving_now: dict[str, WorkerServing] | None = None,
    running_by_state: dict[str, list[str]] | None = None,
) -> ListWorkersResponse:
    """The workers of `infos` (`$SRV.INFO`), with the tasks each serves and the executions it
    runs now where it said so (`serving_now`), else as the execution states say
    (`running_by_state`: worker id -> executions RUNNING under it)."""
    serving_now = serving_now or {}
    running_by_state = running_by_state or {}
    found = []
    for info in infos:
        tasks = [task for task in info.metadata.get("tasks", "").split(",") if task]
        answer = serving_now.get(info.worker_id)
        if answer is not None:
            tasks = answer.tasks
        if request.task_id and request.task_id not in tasks:
            continue
        said = answer.running if answer is not None else None
        found.append(
            WorkerInfo(
                worker_id=info.worker_id,
                tasks=tasks,
                version=info.version,
                instance_id=info.id,
                running_executions=sorted(said if said is not None else running_by_state.get(info.worker_id, [])),
            )
        )
    return ListWorkersResponse(workers=sorted(found, key=lambda w: w.worker_id))


class WorkerServing(msgspec.Struct):
    """A worker's answer on `P.worker.tasks`: what it serves now (registered tasks come and go,
    which its `$SRV.INFO` metadata, fixed at start-up, does not show), its live task instances,
    and the executions it runs: each attempt from before its `started` is stored until its
    function has returned (its end may still be on its way to the log). None: a worker of a
    version before it said so (a rolling upgrade)."""

    worker_id: str = ""
    tasks: list[str] = []
    instances: dict[str, list[InstanceInfo]] = {}
    running: list[str] | None = None
    slots: int = 0  # the attempts it runs at once, over all its tasks (0: an older worker did not say)


def unsaid_running(infos: list[ServiceInfo], serving_now: dict[str, WorkerServing]) -> bool:
    """Whether a worker of `infos` did not say what it runs (an older version, or no answer on
    `P.worker.tasks`): its running executions are then read from the states."""
    said = {worker_id for worker_id, answer in serving_now.items() if answer.running is not None}
    return any(info.worker_id not in said for info in infos)


async def now_serving(
    nc: Client, subject: str, window_s: float = GATHER_S, quiet_s: float = QUIET_S
) -> dict[str, WorkerServing]:
    """Every running worker's answer on `subject` (`P.worker.tasks`), by worker id."""
    found: dict[str, WorkerServing] = {}
    for reply in await gather(nc, subject, window_s, quiet_s):
        try:
            answer = msgspec.json.decode(reply, type=WorkerServing)
        except msgspec.DecodeError:
            continue
        found[answer.worker_id] = answer
    return found


class TaskServing(msgspec.Struct):
    """Which workers serve a task now, and their instances of it."""

    workers: list[str] = []
    instances: list[InstanceInfo] = []


async def serving(nc: Client, subject: str, task_id: str) -> TaskServing:
    """The workers serving `task_id` now and its live instances."""
    found = TaskServing()
    for worker_id, answer in sorted((await now_serving(nc, subject)).items()):
        if task_id in answer.tasks:
            found.workers.append(worker_id)
            found.instances.extend(answer.instances.get(task_id, []))
    found.instances.sort(key=lambda i: (i.worker_id, i.instance_id))
    return found
