"""What one bench run does at most, and the targets of issue 11 it is judged against."""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 64  # requests in flight in the throughput phases


ECHO = {"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": 1}]}


@dataclass(frozen=True)
class Plan:
    """How much each phase does at most: `calls` operations, `phase_s` seconds."""

    sync_calls: int
    async_calls: int
    status_calls: int
    raw_calls: int
    phase_s: float


FULL = Plan(sync_calls=2000, async_calls=20_000, status_calls=20_000, raw_calls=2000, phase_s=15.0)


QUICK = Plan(sync_calls=200, async_calls=2000, status_calls=2000, raw_calls=300, phase_s=4.0)


# The targets of issue 11 (figure -> (target, "min" or "max")); the regression guard divides them by 10.
TARGETS: dict[str, tuple[float, str]] = {
    "sync_nats_p50_ms": (1.0, "max"),
    "sync_nats_p99_ms": (3.0, "max"),
    "async_accepted_per_s": (15_000, "min"),
    "async_completed_per_s": (5_000, "min"),
    "status_nats_per_s": (10_000, "min"),
    "status_http_per_s": (3_000, "min"),
    "rebuild_events_per_s": (50_000, "min"),
    "healthy_s": (2.0, "max"),
}
