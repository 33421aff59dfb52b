"""Which deliveries are surely an invocation's first: those a quick attempt may run before
anything of it is stored.

A quick attempt calls its function before it stores `started` (attempt.py, design.md "Quick
attempts"): safe only if nothing of the execution can have happened before. JetStream says
`num_delivered == 1`, but a consumer whose state was lost hands out again, as first deliveries,
messages that were processed already: nats-server killed before it wrote their acks, or a
cluster's new consumer leader behind the old one (probe20: after a nats-server kill, 4 to 30 of
500 executions that had ended ran their function once more, unseen in their history). A consumer
hands out new messages in stream order, so such a delivery comes with a stream sequence at or
under one it has handed this worker already; and at a worker's start, whatever is stored may
have been handled by a worker before. Those deliveries are planned from the execution's last
event, and their `started` is stored before the function runs.

With several workers on one consumer, each is handed part of what comes: one that lost its
state may hand a worker a message above the highest it saw, which another worker handled
(review15). Such a consumer hands the lowest of what it lost out first, so once a worker meets
one delivery at or under its highest, every delivery it gets for the next CAREFUL_S is planned
from its last event too.

Pure: the caller gives each delivery's stream sequence and count, and the time.
"""

from __future__ import annotations

CAREFUL_S = 30.0  # after a consumer was seen handing out again what it had: no delivery is surely first


class FirstDeliveries:
    """The highest stream sequence handed to this worker by each task's consumer."""

    def __init__(self, floor: int = 0):
        self.floor = floor  # the stream's last sequence when the worker started
        self._highest: dict[str, int] = {}
        self._careful_until = -CAREFUL_S  # (monotonic seconds)

    def be_careful(self, now: float) -> None:
        """No delivery is surely first for the next CAREFUL_S (the worker may have missed what
        tells it otherwise: cancellations stored while its connection was down)."""
        self._careful_until = max(self._careful_until, now + CAREFUL_S)

    def surely_first(self, task_id: str, stream_seq: int, num_delivered: int, now: float) -> bool:
        """Whether the delivery of `stream_seq` (its `num_delivered`th) by the task's consumer at
        `now` (monotonic seconds) can only be the message's first: noted, so that a later one at
        or under it is not."""
        highest = self._highest.get(task_id, self.floor)
        if stream_seq > highest:
            self._highest[task_id] = stream_seq
        elif num_delivered == 1 and highest > self.floor:  # handed out again: the consumer lost its state
            self._careful_until = now + CAREFUL_S
        return num_delivered == 1 and stream_seq > highest and now >= self._careful_until
