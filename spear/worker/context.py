"""`spear.Context`: the small author-facing view of one attempt, kept apart from the worker machinery.

A function that declares a parameter named `ctx`, or one annotated `spear.Context`, receives it:

    @shop.function
    def ship(ctx: spear.Context, order_id: str) -> dict:
        ctx.log(f"shipping {order_id}, attempt {ctx.attempt}")
        for step in range(10):
            if ctx.cancelled:               # true once cancellation was requested
                raise spear.ExecutionCancelled("stopped on request")
            ctx.progress((step + 1) / 10, f"step {step + 1}")
        return {"order_id": order_id, "seconds_left": ctx.deadline - time.time()}

Log lines and progress reports become `log` events of the execution (see `include_logs` and
`result.metrics.progress` in the status). They are bounded: a line is cut at `MAX_LOG_CHARS`
characters and an attempt stores at most `MAX_LOGS_PER_ATTEMPT` lines (then one line saying
that further ones were dropped); progress reports are coalesced: one not yet stored gives way to a
newer one, unless a log line came between them.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spear.core.enums import ErrorCode
from spear.core.jsonlimits import JsonRejected, bounded_text, encode_storable

MAX_LOG_CHARS = 4096
MAX_LOGS_PER_ATTEMPT = 1000


class InvalidArgument(ValueError):
    """Raised by a function whose parameters are unusable: the execution fails `INVALID_ARGUMENT`
    (not retried)."""


class NonRetryableError(Exception):
    """Raised by a function to fail at once (`FUNCTION_ERROR`), without using the retries left."""


class ResultNotSerializable(NonRetryableError):
    """A return value or streamed item that JSON cannot hold faithfully: RESULT_NOT_SERIALIZABLE."""


class ExecutionCancelled(Exception):
    """Raised by a function (or `ctx.raise_if_cancelled()`) that stops because cancellation was
    asked for: the execution ends `CANCELLED`."""


class ReportedFailure(Exception):
    """A failure whose message is reported as it is (no exception type in front), with its own
    error code: a process artifact's stderr, a changed artifact."""

    error_code: ErrorCode = ErrorCode.FUNCTION_ERROR
    retryable: bool = True

    def __init__(
        self,
        message: str,
        error_code: ErrorCode | None = None,
        retryable: bool | None = None,
        exit_code: int | None = None,
    ):
        super().__init__(message)
        if error_code is not None:
            self.error_code = error_code
        if retryable is not None:
            self.retryable = retryable
        self.exit_code = exit_code  # a process's that ended the call (-N: signal N)


# What ends every process of a service being stopped: systemd signals a unit's whole cgroup at
# once (isolation children ignore SIGINT, and they and process artifacts run in sessions of their
# own, out of a terminal's SIGHUP: only SIGTERM reaches them all with their worker: review46).
STOP_SIGNALS = frozenset({signal.SIGTERM})


def stopped_by_signal(exc: BaseException | None) -> bool:
    """Whether `exc` says the function's own process was ended by a stop signal (not a crash)."""
    code = getattr(exc, "exit_code", None)
    return isinstance(code, int) and code < 0 and -code in STOP_SIGNALS


Reporter = Callable[[float | None, str], None]


@dataclass
class Context:
    """One attempt of one execution, as the running function sees it.

    `deadline` is the wall-clock time (epoch seconds, comparable with `time.time()`) at which the
    attempt's time limit ends; `attempt` counts from 1."""

    execution_id: str
    task_id: str
    function_name: str
    attempt: int
    deadline: float = float("inf")
    _cancelled: bool = field(default=False, repr=False)
    _waker: threading.Event | None = field(default=None, repr=False)  # made by the first wait_cancelled
    latest_progress: float | None = field(default=None, repr=False)
    latest_progress_message: str = field(default="", repr=False)
    # set by the worker: records reports as `log` events (called from any thread)
    on_report: Reporter | None = field(default=None, repr=False)
    # set by the worker for a function in a child process: passes a cancellation on to it
    on_cancel: Callable[[], None] | None = field(default=None, repr=False)
    _logged: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once cancellation of this execution was requested (or its time limit passed)."""
        return self._cancelled

    def cancel(self) -> None:
        """Ask the function to stop (it sees `cancelled`)."""
        self._cancelled = True  # before the waker is read: see wait_cancelled
        waker = self._waker
        if waker is not None:
            waker.set()
        if self.on_cancel is not None:
            self.on_cancel()

    def raise_if_cancelled(self) -> None:
        """Raise ExecutionCancelled if stopping was asked for."""
        if self.cancelled:
            raise ExecutionCancelled(f"execution {self.execution_id} was cancelled")

    def wait_cancelled(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early (and returning True) if cancelled."""
        waker = self._waker
        if waker is None:  # made here, not per attempt: a threading.Event is not cheap
            with self._lock:
                if self._waker is None:
                    self._waker = threading.Event()
                waker = self._waker
        if self._cancelled:  # set before the waker existed (cancel reads the waker after the flag)
            waker.set()
        return waker.wait(seconds)

    @property
    def remaining_s(self) -> float:
        """Seconds left before the attempt's time limit (never negative)."""
        return max(0.0, self.deadline - time.time())

    def progress(self, fraction: float, message: str = "") -> None:
        """Progress from 0 to 1 (clamped): a running execution's status shows the latest in
        `result.metrics` (`progress`, `progress_message`); the history keeps each stored one."""
        fraction = float(fraction)
        if math.isnan(fraction):  # not a number: no report (the latest stands)
            return
        self.latest_progress = max(0.0, min(1.0, fraction))
        self.latest_progress_message = "" if message is None else _bounded(str(message))  # (None: no message)
        if self.on_report:
            self.on_report(self.latest_progress, self.latest_progress_message)

    report_progress = progress  # the name the first versions used

    def log(self, message: str) -> None:
        """A line for the execution's logs (`include_logs=true`), bounded as the module says."""
        with self._lock:
            self._logged += 1
            count = self._logged
        if count > MAX_LOGS_PER_ATTEMPT + 1 or not self.on_report:
            return
        if count == MAX_LOGS_PER_ATTEMPT + 1:
            line = f"[more log lines dropped: at most {MAX_LOGS_PER_ATTEMPT} are kept per attempt]"
        else:
            line = _bounded(str(message))
        self.on_report(None, line)


def _bounded(text: str) -> str:
    return bounded_text(text, MAX_LOG_CHARS)


class StreamedItems(list[Any]):
    """A streaming function's result when it returns none: the list of the items it yielded,
    each of them stored as a chunk already. Items are kept (`keep`) while the list's JSON stays
    within `limit` bytes, what one event can carry: a longer list is left out of the result
    anyway (its items are the chunks), so past that they are only counted (probe32: a worker
    held every item of a 600 MB stream until its end)."""

    limit = 64 << 20  # NATS's largest max_payload; a worker sets what its connection carries

    def __init__(self) -> None:
        super().__init__()
        self.yielded = 0  # items yielded
        self.size = 1  # bytes of the list as JSON: "[]", and a separator between items (review29)
        self.overflowed = False  # more than `limit`: the items are no longer kept

    def keep(self, item: Any) -> None:
        """One more item the function yielded."""
        self.yielded += 1
        if self.overflowed:
            return
        with contextlib.suppress(JsonRejected):  # (its chunk fails the attempt)
            self.size += len(encode_storable(item)) + 1
        if self.size > self.limit:
            self.overflowed = True
            self.clear()
        else:
            self.append(item)
