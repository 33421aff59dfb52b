"""Noticing that the worker's loop did not run for a while (its process stopped with SIGSTOP, a
debugger, a starved CPU), so that what it reads right after is not taken at face value.

JetStream goes on while a worker is paused: an invocation handed to it (or handed to it meanwhile,
into its socket) is handed out again once the ack wait has passed, and another worker may start
it. Resumed, the worker reads those old deliveries as if they were new. Planned from the log, the
other worker's live attempt looked lost (its `started` and nothing after): failed WORKER_LOST, or
run again beside itself (probe27's r4); a first delivery ran its function at once, a second time
(review21). A tick every TICK_S notices a gap in the loop's time; a delivery read during a gap's
aftermath is *suspect*: planned from the log first, and an attempt that looks lost from it is
left alone. Should that attempt really be lost, JetStream hands the invocation out again an ack
wait later, and that delivery takes it for lost as usual.

A connection that stalls (the network, a proxy) while the process runs on holds deliveries back
the same way, with no gap in the loop to show it; its pull consumer notices the silence instead
(no heartbeat of a pull request for `threshold_s`: PullConsumer.stalled). (Not the time in the
ack subject: that is when the message was stored, so every redelivery and every invocation that
waited in the stream looked held up: review23.)
"""

from __future__ import annotations

import asyncio
import math
import time

TICK_S = 0.1
SETTLE_S = 1.0  # how long after a pause what is read counts as read in its aftermath


class PauseWatch:
    """Whether the loop went `threshold_s` or more without running, just now."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self._ticked = math.inf  # (not ticking yet: a worker starting up is no paused one)
        self._resumed_at = -SETTLE_S  # when a pause was last noticed

    def start(self) -> asyncio.Task[None]:
        """Tick from now on, until the task returned is cancelled. Before the worker takes work:
        a pause between its first pull and the first tick went unnoticed (CI: a worker stopped as
        it started read its old delivery as a first one, and ran it)."""
        self._ticked = time.monotonic()
        return asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if now - self._ticked > self.threshold_s:
                self._resumed_at = now
            self._ticked = now

    def suspect(self) -> bool:
        """Whether what is read now may have waited out a pause: the loop has not ticked for
        `threshold_s` (the tick has not run yet since it resumed), or a pause ended a moment ago."""
        now = time.monotonic()
        return now - self._ticked > self.threshold_s or now - self._resumed_at < SETTLE_S
