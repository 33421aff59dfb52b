"""The figures as ratios to raw NATS, targets met, and the table printed without --json."""

from __future__ import annotations

from typing import Any

from spear.cli.bench.plan import TARGETS
from spear.cli.output import table


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    """spear against raw NATS: round trips per SYNC call, shares of NATS's own rates."""
    raw = figures["raw"]
    pairs = {
        "sync_nats_p50_in_round_trips": ("sync_nats_p50_ms", raw["request_reply_p50_ms"]),
        "sync_http_p50_in_round_trips": ("sync_http_p50_ms", raw["request_reply_p50_ms"]),
        "async_accepted_of_publish_rate": ("async_accepted_per_s", raw["publish_per_s"]),
        "async_completed_of_publish_rate": ("async_completed_per_s", raw["publish_per_s"]),
        "status_nats_of_request_rate": ("status_nats_per_s", raw["request_reply_per_s"]),
    }
    return {name: round(figures[key] / base, 3) for name, (key, base) in pairs.items() if key in figures and base}


def met(value: float | None, target: float, way: str) -> bool | None:
    """Whether `value` meets its target (`way`: max or min); None if not measured."""
    if value is None:
        return None
    return value <= target if way == "max" else value >= target


ROWS = [
    ("time from spear up to healthy", "healthy_s", "s"),
    ("SYNC over NATS p50", "sync_nats_p50_ms", "ms"),
    ("SYNC over NATS p99", "sync_nats_p99_ms", "ms"),
    ("SYNC over HTTP p50", "sync_http_p50_ms", "ms"),
    ("SYNC over HTTP p99", "sync_http_p99_ms", "ms"),
    ("ASYNC accepted", "async_accepted_per_s", "/s"),
    ("ASYNC completed end to end", "async_completed_per_s", "/s"),
    ("status over NATS", "status_nats_per_s", "/s"),
    ("status over HTTP", "status_http_per_s", "/s"),
    ("projection rebuild", "rebuild_events_per_s", "events/s"),
    ("rebuild CPU (replaying process)", "rebuild_cpu_us_per_event", "µs/event"),
]


def render(figures: dict[str, Any]) -> str:
    """The figures as a text table, each beside its target."""
    rows = []
    for label, key, unit in ROWS:
        if key in figures:
            target = TARGETS.get(key)
            goal = f"{'≤' if target[1] == 'max' else '≥'} {target[0]:g}" if target else ""
            mark = {True: "yes", False: "no", None: ""}[met(figures[key], *target) if target else None]
            rows.append((label, f"{figures[key]:g} {unit}", goal, mark))
    raw = figures["raw"]
    lines = [table(("figure", "spear", "target", "met"), rows), ""]
    lines.append(
        f"raw NATS: request-reply p50 {raw['request_reply_p50_ms']:g} ms, {raw['request_reply_per_s']} /s; "
        f"acked JetStream publish p50 {raw['publish_p50_ms']:g} ms, {raw['publish_per_s']} /s"
    )
    lines += [f"  {name}: {value:g}" for name, value in figures["ratios"].items()]
    for key in ("cpu_ms_per_sync_call", "cpu_ms_per_async_execution", "cpu_ms_per_status_query"):
        if figures.get(key):
            parts = ", ".join(f"{part} {ms:g} ms" for part, ms in figures[key].items())
            lines.append(f"CPU {key.removeprefix('cpu_ms_per_').replace('_', ' ')}: {parts}")
    if figures.get("async_not_completed"):
        lines.append(f"ASYNC executions not completed within the phase: {figures['async_not_completed']}")
    if figures.get("async_given_up"):
        lines.append(f"ASYNC calls refused for a full queue until the phase's time was up: {figures['async_given_up']}")
    return "\n".join(lines)
