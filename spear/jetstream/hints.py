"""Live events as hints: what the stream re-publishes once stored carries its `Nats-Stream` and
`Nats-Sequence` headers. Anyone allowed to publish on `P.exec.>` can imitate those too, so a
reader that acts on a hint confirms it against the stream first (ARCHITECTURE.md, known traps);
this check only keeps core publishes and garbage from costing that confirmation.
"""

from __future__ import annotations

from nats.aio.msg import Msg


def stored_sequence(msg: Msg, stream: str) -> int | None:
    """The stream sequence a live message claims, or None if it does not look re-published."""
    headers = msg.headers or {}
    if headers.get("Nats-Stream") != stream:
        return None
    text = headers.get("Nats-Sequence", "")
    if not text.isdigit() or len(text) > 20:
        return None
    return int(text)


def is_stored_hint(msg: Msg, stream: str) -> bool:
    """Whether a live message looks re-published by the stream (a hint to read it back)."""
    return stored_sequence(msg, stream) is not None
