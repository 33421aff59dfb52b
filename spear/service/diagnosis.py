"""Why spear is not healthy, in words: the reasons `GetHealth` reports in `message`.

This module finds tasks whose invocations wait with no worker to take them: a task's pending
invocations are its worker consumer's `num_pending + num_ack_pending`, and a worker serves the
tasks it names on `P.worker.tasks` (every worker answers, registered tasks included). The
projection's lag, stalls and poison invocations are reported beside these by the health read
itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import nats.errors
from nats.aio.client import Client

from spear.core.enums import ApiError
from spear.core.names import Names
from spear.service.admission import Admission
from spear.service.workers import now_serving

GATHER_S = 0.5  # the most the health read waits for the worker instances' $SRV.INFO replies
QUIET_S = 0.1  # after a reply, how long to wait for another


async def unserved_tasks(nc: Client, names: Names, admission: Admission, task_ids: Iterable[str]) -> list[str]:
    """ "no worker serves task X (N invocations waiting)" for each such task; [] if none (or unknown)."""
    waiting: dict[str, int] = {}
    for task_id in task_ids:
        try:
            depth = await admission.depth(task_id)
        except (ApiError, nats.errors.Error):
            return []  # JetStream does not answer: that is reported as such
        # Queued, or held (a lost worker's, or one handed back while its worker stopped):
        # either way, no worker will finish them if none serves the task.
        if depth.waiting + depth.held > 0:
            waiting[task_id] = depth.waiting + depth.held
    if not waiting:
        return []  # the usual case costs one cached consumer read per task, no gathering
    served = await served_tasks(nc, names)
    return [
        f"no worker serves task {task_id!r} ({count} invocation{'s' if count != 1 else ''} pending)"
        for task_id, count in sorted(waiting.items())
        if task_id not in served
    ]


async def served_tasks(nc: Client, names: Names) -> set[str]:
    """The tasks the running workers of this subject prefix say they serve now (registered tasks
    included: each worker answers on `P.worker.tasks`)."""
    served: set[str] = set()
    for answer in (await now_serving(nc, names.worker_tasks, GATHER_S, QUIET_S)).values():
        served.update(answer.tasks)
    return served
