"""Hiding secrets on the way out: `context.headers` and `context.environment` values whose key
matches a configured pattern are replaced by a marker in everything spear returns, and so is the
password of a URL in any other value (`DATABASE_URL=postgres://app:hunter2@db/app`, probe34).
Pure.

The stored `requested` event keeps the real values (the worker needs them): redaction happens on
read, so changing the patterns changes what is shown, never what is stored.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import TypeVar

import msgspec

from spear.core.config import url_passwords_hidden
from spear.core.events import AnyEvent, Requested

REDACTED = "[REDACTED]"

E = TypeVar("E", bound=AnyEvent)


class Redactor:
    """Replaces sensitive context values by a marker in what readers see."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [p.lower() for p in patterns]

    def sensitive(self, key: str) -> bool:
        """Whether a header or environment key matches a redaction pattern."""
        lowered = key.lower()
        return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self.patterns)

    def values(self, values: dict[str, str]) -> dict[str, str]:
        """`values` with the sensitive ones replaced, and URLs' passwords in the others."""
        return {k: REDACTED if self.sensitive(k) else url_passwords_hidden(v, REDACTED) for k, v in values.items()}

    def event(self, event: E) -> E:
        """The event as it may be shown: only `requested` carries a context."""
        if not isinstance(event, Requested) or not self.patterns:
            return event
        context = msgspec.structs.replace(
            event.context,
            headers=self.values(event.context.headers),
            environment=self.values(event.context.environment),
        )
        return msgspec.structs.replace(event, context=context)
