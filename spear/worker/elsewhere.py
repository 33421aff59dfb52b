"""Whether another live worker serves a function of a code task that this worker's release lacks.

In a rolling upgrade the registry holds the newest release's definition, so gateways accept calls
of its new functions, and JetStream hands them to any worker of the task. A worker of an older
release asks the others: each answers on `P.worker.functions` with the functions of its code
tasks, from before it registers them until it begins to stop. With a "yes" the call is handed
back for another worker; without one it ends FUNCTION_NOT_FOUND (docs/design.md, "Workers").
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import msgspec
import nats.errors
from nats.aio.client import Client

from spear.jetstream import scatter

WINDOW_S = 2.0  # the most one question waits for answers
QUIET_S = 0.5  # after an answer that is no "yes", how long the next one may take
FRESH_S = 1.0  # a "yes" is taken as still true this long (a burst of such calls asks once)
MAX_REMEMBERED = 1_000


class Functions(msgspec.Struct):
    """A worker's answer: task id -> the functions of that code task it takes invocations of."""

    functions: dict[str, list[str]] = {}


def answer(functions: dict[str, list[str]]) -> bytes:
    """What a worker serving these code tasks' functions answers."""
    return msgspec.json.encode(Functions(functions))


class Elsewhere:
    """Asks the live workers whether one of them serves a function (the asking worker lacks it)."""

    def __init__(self, nc: Client, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self._yes: dict[tuple[str, str], float] = {}  # (task, function) -> when a worker last said it serves it
        # (task, function) -> the question out now: deliveries meanwhile wait for its answer, so a
        # burst asks once whatever the answer (review25: 16 calls at once asked 16 times)
        self._asking: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self.asked = 0  # questions sent, ever

    async def serves(self, task_id: str, function_name: str, window_s: float = WINDOW_S) -> bool:
        """Whether another live worker takes invocations of `function_name` of `task_id` now: the
        first "yes" ends the question; without one it ends `QUIET_S` after the last answer, or at
        `window_s`. nats.errors.TimeoutError if no answer came at all, not even the asking
        worker's own (the question did not get through), and any nats-py error: the caller hands
        the call back."""
        key = (task_id, function_name)
        said = self._yes.get(key)
        if said is not None and time.monotonic() - said < FRESH_S:
            return True
        asking = self._asking.get(key)
        if asking is not None:
            return await asyncio.shield(asking)
        asking = asyncio.ensure_future(self._ask(task_id, function_name, window_s))
        self._asking[key] = asking
        asking.add_done_callback(lambda done: self._asked(key, done))
        # (shielded: a waiter cancelled, its worker stopping, leaves the question to the others)
        if await asyncio.shield(asking):
            self._yes.pop(key, None)
            self._yes[key] = time.monotonic()
            if len(self._yes) > MAX_REMEMBERED:  # (a bound: the oldest are forgotten)
                self._yes.pop(next(iter(self._yes)))
            return True
        self._yes.pop(key, None)
        return False

    def _asked(self, key: tuple[str, str], done: asyncio.Future[bool]) -> None:
        if self._asking.get(key) is done:
            del self._asking[key]
        if not done.cancelled():
            done.exception()  # (retrieved: every waiter may have gone)

    async def _ask(self, task_id: str, function_name: str, window_s: float) -> bool:
        self.asked += 1
        answered = False
        async with aclosing(scatter.replies(self.nc, self.subject, window_s, QUIET_S)) as answers:
            async for answer in answers:
                answered = True  # (the asking worker answers too: without the function)
                try:
                    functions = msgspec.json.decode(answer, type=Functions).functions
                except msgspec.DecodeError:
                    functions = {}
                if function_name in functions.get(task_id, ()):
                    return True
        if not answered:
            # The question did not get through (NATS away, a publish the server refused): the
            # silence says nothing about the other workers.
            raise nats.errors.TimeoutError
        return False
