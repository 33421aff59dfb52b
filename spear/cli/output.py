"""How the CLI shows things: results on stdout (so they pipe), status lines on stderr, tables,
the event timeline and a progress bar; or, with `--json`, the wire objects as JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from spear.client import Event, Execution

STATUS_WORDS = {
    "EXECUTION_STATUS_PENDING": "pending",
    "EXECUTION_STATUS_RUNNING": "running",
    "EXECUTION_STATUS_COMPLETED": "completed",
    "EXECUTION_STATUS_FAILED": "failed",
    "EXECUTION_STATUS_CANCELLED": "cancelled",
    "EXECUTION_STATUS_TIMEOUT": "timed out",
}


# C0 controls but tab and newline, DEL, C1 controls and the bidirectional overrides: text from
# the server (a failure message, a log line, a result) that would retitle, clear or redraw an
# operator's terminal, or show itself reversed (probe57: `spear status` of a failure printed
# "FAKE: all good" over a cleared screen), shown as escapes instead.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}
_CONTROLS.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def plain(text: str) -> str:
    """`text` with the characters that act on a terminal written as escapes (`\\x1b`)."""
    return text.translate(_CONTROLS)


def for_stream(text: str, stream: TextIO) -> str:
    """Data (a result, a chunk) as it is for a pipe or a file, `plain` for a terminal."""
    return plain(text) if stream.isatty() else text


def show_json(document: Any, stream: TextIO | None = None, indent: int | None = 2) -> None:
    """Write `document` as JSON (to stdout by default)."""
    print(json.dumps(document, indent=indent, ensure_ascii=False), file=stream or sys.stdout, flush=True)


def say(text: str) -> None:
    """A status line, on stderr: stdout keeps only results."""
    print(plain(text), file=sys.stderr, flush=True)


def word(status: str) -> str:
    """A status as a short lower-case word (`completed`)."""
    return STATUS_WORDS.get(status, status.removeprefix("EXECUTION_STATUS_").lower() or "unknown")


def value(result: Any) -> str:
    """A result as a user reads it: strings as they are, anything else as JSON."""
    if isinstance(result, str):
        return result
    text = json.dumps(result, ensure_ascii=False)
    return text if len(text) <= 100 else json.dumps(result, indent=2, ensure_ascii=False)


def duration(ms: int | float | None) -> str:
    """Milliseconds as a short human duration (`1.2 s`); `-` if unknown."""
    if ms is None:
        return "-"
    if ms < 1:
        return "<1 ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    return f"{int(ms // 60_000)} min {ms % 60_000 / 1000:.0f} s"


def outcome_line(execution_id: str, result: Mapping[str, Any]) -> str:
    """`completed in 12 ms · execution 01J…` or `failed in 3 ms: FUNCTION_ERROR RuntimeError: boom · …`."""
    status = str(result.get("status", ""))
    line = f"{word(status)} in {duration(result.get('execution_time_ms'))}"
    if result.get("error_code") or result.get("error_message"):
        line += f": {result.get('error_code', '')} {result.get('error_message', '')}".rstrip()
    attempt = result.get("attempt") or 0
    if attempt > 1:
        line += f" (attempt {attempt})"
    return f"{line} · execution {execution_id}"


def execution_table(execution: Execution) -> str:
    """An execution as aligned `name: value` lines."""
    rows: list[tuple[str, str]] = [
        ("execution", execution.id),
        ("function", f"{execution.task_id}.{execution.function_name}"),
        ("status", word(execution.status) + (f" (attempt {execution.attempt})" if execution.attempt > 1 else "")),
        ("requested", execution.requested_at or "-"),
        ("started", execution.started_at or "-"),
    ]
    if execution.done:
        rows += [("ended", execution.completed_at or "-"), ("duration", duration(execution.execution_time_ms))]
    if execution.progress is not None and not execution.done:
        rows.append(("progress", f"{bar(execution.progress)} {execution.progress_message}".rstrip()))
    if execution.error_code or execution.error_message:
        rows.append(("error", f"{execution.error_code} {execution.error_message}".strip()))
    if execution.traceback:
        rows.append(("traceback", execution.traceback.replace("\n", "\n" + " " * 11)))
    if execution.status == "EXECUTION_STATUS_COMPLETED":
        rows.append(("result", value(execution.result)))
    rows += [("log", line) for line in execution.logs]
    return plain("\n".join(f"{name:<10} {text}" for name, text in rows))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns as wide as their widest cell; the last one is not padded."""
    cells = [[plain(str(c)) for c in headers]] + [[plain(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)) + "  " + row[-1]
        for row in cells
    ).replace("  \n", "\n")


def parameters(function: Mapping[str, Any]) -> str:
    """A function's parameters as `n: int, [top: int]` (optional ones in brackets)."""
    shown = []
    for parameter in function.get("parameters", []):
        text = parameter["name"] + (f": {parameter['type']}" if parameter.get("type") else "")
        shown.append(text if parameter.get("required", True) else f"[{text}]")
    if function.get("accepts_any"):
        shown.append(f"**{function.get('var_keyword') or 'kwargs'}")  # (its own name: probe66)
    return ", ".join(shown) or "-"


def bar(fraction: float, width: int = 20) -> str:
    """A text progress bar for a fraction in [0, 1]."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


def event_line(event: Event) -> str:
    """One line of `spear watch`'s timeline."""
    clock = event.at[11:23] if len(event.at) >= 23 else event.at
    data = event.data
    detail = ""
    match event.type:
        case "requested":
            detail = _requested(data)
        case "started":
            detail = f"attempt {event.attempt}" + (f" on {data['worker_id']}" if data.get("worker_id") else "")
        case "log":
            progress = event.progress
            detail = event.message if progress is None else f"{bar(progress)} {event.message}".rstrip()
        case "chunk":
            detail = f"#{data.get('seq')} {value(data.get('data'))}"
        case "retrying":
            detail = f"attempt {event.attempt} failed: {event.result.get('error_code', '')} " + (
                f"{event.result.get('error_message', '')}; next in {duration(data.get('delay_ms'))}"
            )
        case "cancel_requested":
            detail = (data.get("reason") or "") + (" (force)" if data.get("force") else "")
        case "released":
            detail = f"attempt {event.attempt} handed back ({data.get('reason') or 'worker stopping'})"
        case _ if event.terminal:
            result = event.result
            detail = f"in {duration(result.get('execution_time_ms'))}"
            if result.get("error_code") or result.get("error_message"):
                detail += f": {result.get('error_code', '')} {result.get('error_message', '')}".rstrip()
            elif event.type == "completed":
                detail += f" → {value(result.get('result'))}"
    kind = "progress" if event.type == "log" and event.progress is not None else event.type
    return plain(f"{clock}  {kind:<16} {detail}".rstrip())


def _requested(data: Mapping[str, Any]) -> str:
    mode = str(data.get("execution_mode", "")).removeprefix("EXECUTION_MODE_").lower()
    return f"{data.get('task_id')}.{data.get('function_name')}" + (f" ({mode})" if mode else "")
