"""Why spear is not healthy, in words: the reasons `GetHealth` reports in `message`.

This module finds tasks whose invocations wait with no worker to take them: a task's pending
invocations are its worker consumer's `num_pending + num_ack_pending` (when few, only those whose
executions have not ended: a cancelled one stays in the consumer until a worker takes it), and a
worker serves the tasks it names on `P.worker.tasks` (every worker answers, registered tasks
included). The
projection's lag, stalls and poison invocations are reported beside these by the health read
itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import nats.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from spear.core.enums import ApiError
from spear.core.eventstore import StoreUnavailable
from spear.core.names import Names
from spear.jetstream import directget
from spear.service.admission import Admission
from spear.service.views import state_of
from spear.service.workers import now_serving

CHECKED_AT_MOST = 256  # an unserved task's pending invocations read one by one, at most
GATHER_S = 0.5  # the most the health read waits for the worker instances' $SRV.INFO replies
QUIET_S = 0.1  # after a reply, how long to wait for another


async def unserved_tasks(
    nc: Client, names: Names, admission: Admission, task_ids: Iterable[str], timeout: float = 2.0
) -> list[str]:
    """ "no worker serves task X (N invocations pending)" for each such task, counting only
    executions that have not ended; [] if none (or unknown)."""
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
    reasons = []
    for task_id, count in sorted(waiting.items()):
        if task_id in served:
            continue
        count = await _not_ended(nc, names, task_id, count, timeout)
        if count:
            reasons.append(f"no worker serves task {task_id!r} ({count} invocation{'s' if count != 1 else ''} pending)")
    return reasons


async def _not_ended(nc: Client, names: Names, task_id: str, count: int, timeout: float) -> int:
    """How many of an unserved task's `count` pending invocations belong to executions that have
    not ended, when they are few enough to read (CHECKED_AT_MOST); else `count`. An invocation
    cancelled before any worker took it stays in the task's consumer until one does: health once
    stayed degraded for it (a probe: "2 invocations pending", both cancelled)."""
    if count > CHECKED_AT_MOST:
        return count
    try:
        try:
            info = await nc.jetstream().consumer_info(names.stream, names.worker_consumer(task_id), timeout=timeout)
            after = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
        except NotFoundError:  # no worker ever served the task: its invocations from the start
            after = 0
        requested = await directget.read_batch(
            nc, names.stream, names.event(task_id, "*", "requested"), after + 1, timeout, CHECKED_AT_MOST
        )
        if requested.more:  # more than were read: not all of them can be told apart here
            return count
        ids = [names.event_execution_id(found.subject) for found in requested.found]
        bucket = names.state_bucket
        stored = await directget.newest_of(
            nc, f"KV_{bucket}", [f"$KV.{bucket}.{names.state_key(i)}" for i in ids], timeout
        )
    except (nats.errors.Error, StoreUnavailable):
        return count
    ended = {state.execution_id for found in stored if (state := state_of(found)) is not None and state.terminal}
    return min(count, sum(1 for execution_id in ids if execution_id not in ended))


async def served_tasks(nc: Client, names: Names) -> set[str]:
    """The tasks the running workers of this subject prefix say they serve now (registered tasks
    included: each worker answers on `P.worker.tasks`)."""
    served: set[str] = set()
    for answer in (await now_serving(nc, names.worker_tasks, GATHER_S, QUIET_S)).values():
        served.update(answer.tasks)
    return served
