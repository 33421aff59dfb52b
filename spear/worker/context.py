"""The small author-facing view of one execution, kept apart from the worker machinery.

A function that declares a `ctx` parameter receives it: its ids, the attempt number, whether
cancellation was asked for, and a way to report progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class InvalidArgument(ValueError):
    """Raised by a function whose parameters are unusable: the execution fails `INVALID_ARGUMENT`."""


class NonRetryableError(Exception):
    """Raised by a function to fail at once, without the retries left."""


class ExecutionCancelled(Exception):
    """Raised by `ctx.raise_if_cancelled()`: the function stops because cancellation was asked for."""


@dataclass
class Context:
    execution_id: str
    task_id: str
    function_name: str
    attempt: int
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    progress: float = 0.0
    progress_message: str = ""
    # set by the worker: records progress as `log` events (may be called from any thread)
    on_report: Callable[[float | None, str], None] | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise ExecutionCancelled(f"execution {self.execution_id} was cancelled")

    def wait_cancelled(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early (and returning True) if cancelled."""
        return self._cancel.wait(seconds)

    def report_progress(self, fraction: float, message: str = "") -> None:
        """Progress from 0 to 1; status queries show the latest, the history keeps each one."""
        self.progress = max(0.0, min(1.0, float(fraction)))
        self.progress_message = message
        if self.on_report:
            self.on_report(self.progress, message)

    def log(self, message: str) -> None:
        """A line for the execution's logs (`include_logs`)."""
        if self.on_report:
            self.on_report(None, message)
