"""How many attempts of a task the workers serving it can run at once: what an estimate shares a
queue among before the workers have shown it.

Admission sees how many invocations the workers hold only when it reads the queue, and it reads
while calls come: in a burst, before the workers took theirs (probe47: 32 sleeps of 1 s sent at
once to 16 slots were told up to 32 s, and came in 2 s). Each worker says its slots in its answer
on `P.worker.tasks` (`WorkerServing.slots`); the sum over the workers serving a task is kept here,
gathered in the background at most every REFRESH_S, never on a request's path. A worker's slots
are shared among its tasks, so this is what the task gets when the others are quiet.
"""

from __future__ import annotations

import time

from nats.aio.client import Client

from spear.aio import SharedReads
from spear.service import workers

REFRESH_S = 10.0  # how old the figures may get before a caller starts a new gathering


class WorkerSlots:
    """The slots of the workers serving each task, as they last said."""

    def __init__(self, nc: Client, subject: str) -> None:
        self.nc = nc
        self.subject = subject  # `P.worker.tasks`
        self._slots: dict[str, int] = {}  # task -> the slots of the workers serving it
        self._gathered_at = 0.0  # (monotonic) when the last gathering was started; 0: never
        self._served: dict[str, int] | None = None  # task -> workers that said they serve it (None: not asked yet)
        self._gatherings: SharedReads[None] = SharedReads()

    def of(self, task_id: str) -> int:
        """The task's slots as last gathered (0: not known yet), and a new gathering started in
        the background if that was long ago."""
        now = time.monotonic()
        if not self._gathered_at or now - self._gathered_at >= REFRESH_S:
            self._gathered_at = now
            self._gatherings.start("slots", self._gather)
        return self._slots.get(task_id, 0)

    async def _gather(self) -> None:
        slots: dict[str, int] = {}
        served: dict[str, int] = {}
        for answer in (await workers.now_serving(self.nc, self.subject)).values():
            for task_id in answer.tasks:  # (an older worker says no slots: it serves them all the same)
                served[task_id] = served.get(task_id, 0) + 1
                slots[task_id] = slots.get(task_id, 0) + answer.slots
        self._slots, self._served = slots, served

    def unserved(self, task_id: str) -> bool:
        """Whether no worker said it serves the task at the last gathering (False while none
        ended); a new gathering is started if that was long ago."""
        self.of(task_id)
        return self._served is not None and task_id not in self._served

    def workers_of(self, task_ids: list[str]) -> dict[str, int] | None:
        """How many workers serve each of `task_ids`, as last gathered (None: not yet); a new
        gathering is started if that was long ago."""
        for task_id in task_ids[:1]:
            self.of(task_id)
        served = self._served
        return None if served is None else {task_id: served.get(task_id, 0) for task_id in task_ids}
