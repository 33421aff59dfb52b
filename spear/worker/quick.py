"""A worker's quick first attempts: the first delivery of an invocation of an inline function,
run and stored from the read loop's callbacks.

The usual path (`Worker.process`) takes each delivery in a task of its own, through a chain of
coroutines: decode, plan from the execution's last event, run the attempt, store `started` and
the attempt's end as one chain, acknowledge. For an inline function (a quick plain one, called on
the loop anyway) of a task served from code, on a delivery that is surely the invocation's first
(firsts.py), with tracing off, every step but the chain's acknowledgement is known without a
wait: here they are done in the delivery's callback, and the acknowledgement of the delivery in
the chain's. The pieces are the usual path's (`run_inline_now`, `end_event`, the chain's message
ids and fences, `append_chain_now`), so the events stored are the same. A worker spent ~130 µs
of CPU on such an execution, the flow's floor ~12 (docs/performance.md, thirteenth round).

Anything else takes the usual path. So does an attempt that logged (its lines are stored between
`started` and its end) and one whose chain was not stored from here (refused, unanswered, or not
sendable without a wait): `Worker.finish_quick` stores its end as the usual path stores the end
of any quick attempt, deciding from the execution's last event after a conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from spear.core.enums import ExecutionMode
from spear.core.events import BadEvent, Event, Requested, Retrying, Started, decode_event, envelope
from spear.core.eventstore import Appended
from spear.core.names import RAN_INLINE_HEADER
from spear.core.state import NextStep, next_step
from spear.jetstream import hpub
from spear.jetstream.pull import Delivery, PullConsumer, ack_info, nak_payload
from spear.jetstream.store import JetStreamStore
from spear.telemetry import logs, tracing
from spear.worker.attempt import Outcome, end_event, run_inline_now
from spear.worker.context import Context
from spear.worker.opening import started_msg_id
from spear.worker.tasks import Function

if TYPE_CHECKING:
    from spear.worker.worker import Worker

log = logging.getLogger(__name__)

_RAN_INLINE = RAN_INLINE_HEADER.encode()
Report = tuple[float | None, str]  # a log line (None) or a progress report, as `Context.on_report` gets it


class QuickAttempts:
    """The first attempts a worker runs and stores without a task, and how many await JetStream."""

    def __init__(self, worker: Worker, store: JetStreamStore, retry_delay_s: float) -> None:
        self.worker = worker
        self.store = store
        self.retry_delay_s = retry_delay_s  # a delivery that could not be processed comes back after this
        self.waiting = 0  # chains sent, not answered yet
        self.taken = 0  # attempts run this way, ever
        self._none_waiting = asyncio.Event()
        self._none_waiting.set()

    async def prepare(self) -> None:
        """Before the first delivery: what sending a chain without a wait needs."""
        await self.store.prepare_now()

    def take(self, delivery: Delivery, consumer: PullConsumer) -> bool:
        """Run this delivery's attempt here (True: it is settled from here, or handed on to the
        worker's usual path with what is known), or leave the delivery to the usual path (False)."""
        worker = self.worker
        try:
            ready = self._ready(delivery)
            if ready is None:
                return False
            request, function, stream_seq = ready
            started = Started(**envelope(request, 1), worker_id=worker.worker_id, instance_id="")
            deadline = time.time() + request.timeout_ms / 1000
            ctx = Context(request.execution_id, request.task_id, request.function_name, 1, deadline=deadline)
        except Exception:  # (an unreadable delivery: the usual path says what is wrong with it)
            return False
        # Last: it notes the delivery (a second look would take it for one handed out again)
        if not worker.surely_first(request.task_id, stream_seq, 1):
            worker.dispatch(delivery, consumer, worker.process(delivery, first=False))
            return True
        self.taken += 1
        reports: list[Report] = []
        ctx.on_report = lambda progress, message: reports.append((progress, message))
        try:
            with logs.execution_context(request.execution_id, request.task_id, request.function_name):
                outcome = run_inline_now(function, request.parameters, ctx, started.at, worker.max_result_size())
        except Exception:  # (its outcome could not be described): as the usual path, redelivered
            log.exception("worker: invocation at %s not processed; it will be redelivered", delivery.subject)
            self._say(delivery, consumer, nak_payload(self.retry_delay_s))
            return True
        if reports or not self._store(delivery, consumer, request, ctx, started, outcome, stream_seq):
            worker.finish_quick(delivery, consumer, request, ctx, started, outcome, stream_seq, reports)
        return True

    def _ready(self, delivery: Delivery) -> tuple[Requested, Function, int] | None:
        """The invocation, its function and stream sequence, if this path may run it."""
        worker = self.worker
        if worker.stopping or tracing.may_record() or worker.store_full_lately():
            return None
        meta = ack_info(delivery)
        if meta.num_delivered != 1 or delivery.carries(_RAN_INLINE):  # (a gateway ran it: see settle.py)
            return None
        try:
            request = decode_event(delivery.data, delivery.subject)
        except BadEvent:
            return None
        if not isinstance(request, Requested) or request.execution_mode == ExecutionMode.STREAM:
            return None
        function = worker.inline_function(request)
        if function is None or next_step(request, request.max_retries) != (NextStep.START, 1):
            return None
        return request, function, meta.stream_seq

    def _store(
        self,
        delivery: Delivery,
        consumer: PullConsumer,
        request: Requested,
        ctx: Context,
        started: Started,
        outcome: Outcome,
        stream_seq: int,
    ) -> bool:
        """Send `started` and the attempt's end as a chain; False if it was not sent."""
        end, end_id = end_event(request, outcome, self.worker.settings.retry)
        traceparent = delivery.header(tracing.TRACEPARENT)  # the invocation's trace, continued as the usual path does
        parent = {tracing.TRACEPARENT: traceparent} if traceparent is not None else None

        def stored(appended: Appended | Exception) -> None:
            self.waiting -= 1
            if not self.waiting:
                self._none_waiting.set()
            if isinstance(appended, Exception):  # decided the usual way, from the last event
                self.worker.finish_quick(delivery, consumer, request, ctx, started, outcome, stream_seq, [])
                return
            self._settle(delivery, consumer, end)

        try:
            sent = self.store.append_chain_now(
                [started, end],
                expect_last_seq=stream_seq,
                msg_ids=[started_msg_id(started, stream_seq), end_id or ""],
                headers=parent,
                on_stored=stored,
            )
        except Exception as exc:  # the connection is closing: the usual path tries again patiently
            log.debug("worker: quick attempt of %s not sent: %s", request.execution_id, exc)
            return False
        if sent:
            self.waiting += 1
            self._none_waiting.clear()
        return sent

    def _settle(self, delivery: Delivery, consumer: PullConsumer, end: Event) -> None:
        """Acknowledge a delivery whose attempt ended (its end is stored), or hand it back for the
        backoff a `retrying` asks for."""
        self._say(delivery, consumer, nak_payload(end.delay_ms / 1000) if isinstance(end, Retrying) else b"+ACK")

    def _say(self, delivery: Delivery, consumer: PullConsumer, payload: bytes) -> None:
        """Settle a delivery (`payload`: an ack or a nak) without a task, and free its slot."""
        nc = self.worker.nc
        try:
            if not hpub.publish_now(nc, delivery.reply, delivery.settle(payload)):
                asyncio.get_running_loop().create_task(nc.publish(delivery.reply, payload))
        except Exception as exc:  # the connection closed: redelivered, it is planned from its last event
            log.debug("worker: delivery at %s not settled: %s", delivery.subject, exc)
        finally:
            consumer.done()

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the chains JetStream has not answered."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_waiting.wait(), max(0.0, timeout_s))
