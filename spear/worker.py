"""The worker: takes `requested` events from its task's shared consumer, runs the function and
appends `started` then `completed` or `failed`, acknowledging only once the terminal event is stored.

Every append names the sequence of the execution's last event it knows of, so two workers (a
redelivery racing a slow original) can never both start, and a late result can never follow a
newer attempt or a second terminal event. Any number of worker processes share one durable
consumer per task, so they split the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service

from spear import contract, topology
from spear.config import Settings
from spear.contract import ExecutionResult
from spear.events import Completed, Failed, Requested, Started, decode_event, is_terminal
from spear.pull import PullConsumer
from spear.runtime.context import Context, InvalidArgument
from spear.runtime.inprocess import run_function
from spear.store import AppendConflict, EventStore
from spear.subjects import Names
from spear.tasks import TaskDefinition

log = logging.getLogger(__name__)

CONFLICT_RETRY_DELAY_S = 5.0


class Worker:
    def __init__(self, nc: Client, settings: Settings, tasks: list[TaskDefinition], worker_id: str | None = None):
        self.nc = nc
        self.settings = settings
        self.names = Names(settings.subject_prefix)
        self.tasks = {task.task_id: task for task in tasks}
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = EventStore(nc, self.names, settings.nats.request_timeout_ms / 1000)
        self.executor = ThreadPoolExecutor(settings.worker.concurrency, thread_name_prefix="spear-fn")
        self.consumers: list[PullConsumer] = []
        self.running: set[asyncio.Task] = set()
        self.service = None

    async def start(self) -> None:
        await topology.ensure_base(self.nc, self.names, self.settings.nats.stream_replicas)
        registry = await self.nc.jetstream().key_value(self.names.tasks_bucket)
        for task in self.tasks.values():
            await registry.put(task.task_id, msgspec.json.encode(task.info()))
            durable = await topology.ensure_worker_consumer(
                self.nc, self.names, task.task_id, self.settings.worker.ack_wait_ms
            )
            consumer = PullConsumer(self.nc, self.names.stream, durable, None, self.settings.worker.concurrency)
            consumer.on_message = lambda msg, task=task, consumer=consumer: self._dispatch(msg, task, consumer)
            await consumer.start()
            self.consumers.append(consumer)
        self.service = await add_service(
            self.nc,
            name=self.names.worker_service_name,
            version="0.1.0",
            description="spear worker",
            metadata={"worker_id": self.worker_id, "tasks": ",".join(self.tasks)},
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        """Take no more work, let running executions finish for `grace_s`; the rest is redelivered."""
        for consumer in self.consumers:
            await consumer.stop()
        if self.running:
            await asyncio.wait(self.running, timeout=grace_s)
        if self.service:
            await self.service.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self, msg: Msg, task: TaskDefinition, consumer: PullConsumer) -> None:
        job = asyncio.get_running_loop().create_task(self._handle(msg, task, consumer))
        self.running.add(job)
        job.add_done_callback(self.running.discard)

    async def _handle(self, msg: Msg, task: TaskDefinition, consumer: PullConsumer) -> None:
        try:
            await self.process(msg, task)
        except Exception:
            # JetStream unreachable or a bug: leave the message to be redelivered, never lost.
            log.exception("worker: invocation at %s not processed; it will be redelivered", msg.subject)
            await _quietly(msg.nak(delay=CONFLICT_RETRY_DELAY_S))
        finally:
            consumer.done()

    async def process(self, msg: Msg, task: TaskDefinition) -> None:
        try:
            request = decode_event(msg.data)
        except msgspec.DecodeError:
            log.error("worker: undecodable event at %s dropped", msg.subject)
            await msg.term()
            return
        if not isinstance(request, Requested):
            await msg.term()
            return
        meta = msg.metadata
        last_seq, attempt = meta.sequence.stream, 1
        if meta.num_delivered > 1:
            last = await self.store.last(request.execution_id)
            if last is None or is_terminal(last.event):
                await msg.ack()
                return
            last_seq = last.seq
            attempt = last.event.attempt + 1 if isinstance(last.event, Started) else max(1, last.event.attempt)

        started = Started(**_common(request, attempt), worker_id=self.worker_id)
        try:
            appended = await self.store.append(
                started, expect_last_seq=last_seq, msg_id=f"{request.execution_id}:started:{attempt}"
            )
            if appended.duplicate:
                raise AppendConflict("attempt already started elsewhere")
        except AppendConflict:
            await self._after_conflict(msg, request)
            return

        result = await self.run(task, request, attempt, started.at)
        terminal_type = Completed if result.status == contract.COMPLETED else Failed
        terminal = terminal_type(**_common(request, attempt), result=result)
        try:
            await self.store.append(
                terminal, expect_last_seq=appended.seq, msg_id=f"{request.execution_id}:terminal:{attempt}"
            )
        except AppendConflict:
            # Fenced: the execution moved on while this attempt ran (a newer attempt, or it ended).
            log.warning("worker: result of %s attempt %d fenced off", request.execution_id, attempt)
        await msg.ack()

    async def _after_conflict(self, msg: Msg, request: Requested) -> None:
        last = await self.store.last(request.execution_id)
        if last is None or is_terminal(last.event):
            await msg.ack()
        else:  # another attempt is live: look again later, in case it dies
            await msg.nak(delay=CONFLICT_RETRY_DELAY_S)

    async def run(self, task: TaskDefinition, request: Requested, attempt: int, started_at: str) -> ExecutionResult:
        """Run the function once and describe the outcome; never raises for the function's errors."""
        fn = task.functions.get(request.function_name)
        ctx = Context(request.execution_id, request.task_id, request.function_name, attempt)
        begin = time.monotonic()
        status, value, code, message = contract.COMPLETED, None, "", ""
        try:
            if fn is None:
                raise LookupError(f"task {task.task_id!r} has no function {request.function_name!r}")
            value = await run_function(fn, request.parameters, ctx, self.executor)
            msgspec.json.encode(value)  # a result must be JSON
        except LookupError as exc:
            status, code, message = contract.FAILED, contract.FUNCTION_NOT_FOUND, str(exc)
        except InvalidArgument as exc:
            status, code, message = contract.FAILED, contract.INVALID_ARGUMENT, str(exc)
        except Exception as exc:
            status, code, message = contract.FAILED, contract.FUNCTION_ERROR, f"{type(exc).__name__}: {exc}"
        if status != contract.COMPLETED:
            value = None
        elapsed_ms = int((time.monotonic() - begin) * 1000)
        return ExecutionResult(
            status=status,
            result=value,
            error_code=code,
            error_message=message,
            execution_time_ms=elapsed_ms,
            started_at=started_at,
            completed_at=contract.format_timestamp(time.time()),
            attempt=attempt,
        )


def _common(request: Requested, attempt: int) -> dict:
    return {
        "execution_id": request.execution_id,
        "task_id": request.task_id,
        "function_name": request.function_name,
        "at": contract.format_timestamp(time.time()),
        "attempt": attempt,
    }


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:
        pass
