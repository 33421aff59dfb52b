"""A worker's quick first attempts: the first delivery of an invocation of an inline function,
run and stored from the read loop's callbacks.

The usual path (`Worker.process`) takes each delivery in a task of its own, through a chain of
coroutines: decode, plan from the execution's last event, run the attempt, store `started` and
the attempt's end as one chain, acknowledge. For an inline function (a quick plain one, called on
the loop anyway) of a task served from code, on a delivery that is surely the invocation's first
(firsts.py), with tracing off, every step but the chain's acknowledgement is known without a
wait: here they are done in the delivery's callback, and the acknowledgement of the delivery in
the chain's. The pieces are the usual path's (`run_inline_now`, `end_event`, the chain's message
ids and fences, `append_chain_now`), so the events stored are the same. The two workers of a
`spear up` spent ~225 µs of CPU per ASYNC execution of `demo.echo` before, ~155 with it (the
flow's floor: ~25; docs/performance.md, thirteenth round).

Anything else takes the usual path. So does an attempt that logged (its lines are stored between
`started` and its end) and one whose chain was not stored from here (refused, unanswered, or not
sendable without a wait): `Worker.finish_quick` stores its end as the usual path stores the end
of any quick attempt, deciding from the execution's last event after a conflict.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import TYPE_CHECKING

from spear.aio import InFlight
from spear.core import contract
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
Report = tuple[float | None, str, str]  # a log line (None) or a progress report, and when it was made


def _trace_of(delivery: Delivery) -> dict[str, str] | None:
    """The trace headers of the invocation, which its events continue (as the usual path's do,
    in the context it adopts from them)."""
    traceparent = delivery.header(tracing.TRACEPARENT)
    if traceparent is None:
        return None
    tracestate = delivery.header(tracing.TRACESTATE)
    if tracestate is None:
        return {tracing.TRACEPARENT: traceparent}
    return {tracing.TRACEPARENT: traceparent, tracing.TRACESTATE: tracestate}


class QuickAttempts:
    """The first attempts a worker runs and stores without a task, and how many await JetStream."""

    def __init__(self, worker: Worker, store: JetStreamStore, retry_delay_s: float) -> None:
        self.worker = worker
        self.store = store
        self.retry_delay_s = retry_delay_s  # a delivery that could not be processed comes back after this
        self.waiting = InFlight()  # chains sent, not answered yet
        self.taken = 0  # attempts run this way, ever

    async def prepare(self) -> None:
        """Before the first delivery: what sending a chain without a wait needs."""
        await self.store.prepare_now()

    def take(self, delivery: Delivery, consumer: PullConsumer, first: bool) -> bool:
        """Run this delivery's attempt here (True: it is settled from here, or handed on to the
        worker's usual path with what is known), or leave the delivery to the usual path (False).
        `first`: whether it is surely the invocation's first delivery (firsts.py), as the worker
        asked when it was read."""
        if not first:
            return False
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
        self.taken += 1
        reports: list[Report] = []
        ctx.on_report = lambda progress, message: reports.append(
            (progress, message, contract.format_timestamp(time.time()))
        )
        try:
            # In a context of its own, as a task would give it: what the function sets in context
            # variables stays with it, not with the connection's read loop and what it starts.
            outcome = contextvars.copy_context().run(self._run, function, request, ctx, started)
        except Exception as exc:  # (its outcome could not be described): counted and redelivered, as the usual path
            try:
                poisoned = worker.quick_attempt_failed(delivery, consumer, request, exc)
            except Exception:  # (the loop is closing): handed back, the slot freed, as below
                poisoned = False
            if not poisoned:
                log.exception("worker: invocation at %s not processed; it will be redelivered", delivery.subject)
                self._say(delivery, consumer, nak_payload(self.retry_delay_s))
            return True
        worker.holding.add(request.execution_id)  # its end is being stored: not run again meanwhile
        if reports or not self._store(delivery, consumer, request, ctx, started, outcome, stream_seq):
            worker.finish_quick(delivery, consumer, request, ctx, started, outcome, stream_seq, reports)
        return True

    def _run(self, function: Function, request: Requested, ctx: Context, started: Started) -> Outcome:
        logs.set_execution(request.execution_id, request.task_id, request.function_name)
        max_result_bytes = self.worker.max_result_size()
        return run_inline_now(function, request.parameters, ctx, started.at, max_result_bytes, request.timeout_ms)

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
        if request.execution_id in worker.holding:  # (its end is being stored here: see `Worker._plan_and_run`)
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
        try:
            end, end_id = end_event(request, outcome, self.worker.settings.retry)
            parent = _trace_of(delivery)
        except Exception as exc:  # (a bug): the usual path stores it, or says what is wrong
            log.warning("worker: quick attempt of %s not sent: %s", request.execution_id, exc)
            return False

        def stored(appended: Appended | Exception) -> None:
            self.waiting.done()
            if isinstance(appended, Exception):  # decided the usual way, from the last event
                self.worker.finish_quick(delivery, consumer, request, ctx, started, outcome, stream_seq, [])
                return
            self.worker.holding.discard(request.execution_id)
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
            self.waiting.add()
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
