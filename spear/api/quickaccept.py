"""ASYNC invocations accepted over NATS without a task: the request decoded and made ready by the
service (`Service.accept_now`), its `requested` event appended from the read loop
(`JetStreamStore.append_now`), the reply sent from the callback that gets JetStream's answer
(`Service.accepted_now`). The same event, the same reply and the same errors as `invoke`, with
the coroutines, the task, the future and the context switches of each call left out: the
gateway's share of an accept was ~100 µs of CPU, of which the floor of the flow takes ~16
(docs/performance.md, twelfth round).

Only what needs no wait before its append goes this way; everything else (SYNC and STREAM, a
NEW_TASK, an id of the client's, headers from the caller, a queue figure or an estimate to read,
tracing on, anything the service refuses) is served as before, in a task, and answered there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client

from spear.aio import InFlight
from spear.api.table import INVOKE, Operation
from spear.core.enums import ApiError
from spear.core.eventstore import Appended
from spear.jetstream import hpub, replies
from spear.service.operations import Service
from spear.telemetry import logs, tracing

log = logging.getLogger(__name__)

# How a reply is made of what the operation gave (the gateway's: metrics and error headers too).
Answer = Callable[[Operation[Any, Any], str, float, Any], tuple[bytes, dict[str, str] | None, ApiError | None]]


class QuickAccepts:
    """The ASYNC invocations a gateway accepts without a task, and how many await JetStream."""

    def __init__(self, nc: Client, service: Service, answer: Answer) -> None:
        self.nc = nc
        self.service = service
        self.answer = answer
        self.waiting = InFlight()  # appended, not answered yet
        self.accepted = 0  # calls taken this way, ever

    def take(self, subject: bytes, reply: bytes, data: bytes) -> bool:
        """Accept this `invoke_function` request here (True), or leave it to the usual path."""
        if not reply or tracing.may_record():  # (the usual path says what a missing reply subject is)
            return False
        if hpub.crowded(self.nc):  # the socket is behind: the usual path waits for it, as a callback cannot
            return False
        began = time.perf_counter()
        try:
            request = INVOKE.decode(data, self.service.settings.api.max_request_bytes)
            ready = self.service.accept_now(request)
            if ready is None:
                return False
            event, estimate = ready

            def stored(outcome: Appended | Exception) -> None:
                self.waiting.done()
                with logs.execution_context(event.execution_id, event.task_id, event.function_name):
                    self._reply(subject, reply, began, lambda: self.service.accepted_now(event, estimate, outcome))

            taken = self.service.record_now(event, stored)
        except Exception:
            return False  # the usual path answers it, saying what is wrong
        if taken:
            self.accepted += 1
            self.waiting.add()
        return taken

    def _reply(self, subject: bytes, reply: bytes, began: float, outcome: Callable[[], Any]) -> None:
        try:
            answered = outcome()
        except Exception as exc:
            answered = exc
        body, headers, _ = self.answer(INVOKE, subject.decode(errors="replace"), began, answered)
        reply_to = reply.decode(errors="replace")
        if not replies.answerable(reply_to):  # (not on a subject that would store the answer)
            return
        try:
            if not hpub.publish_now(self.nc, reply_to, body, headers=headers):
                asyncio.get_running_loop().create_task(self.nc.publish(reply_to, body, headers=headers))
        except Exception as exc:  # the requester is gone or the connection closed
            log.debug("gateway: reply to %s not sent: %s", reply_to, exc)
