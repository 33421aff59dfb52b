"""A faster parser of NATS message headers for nats-py, with the same results.

nats-py 2.16 parses every message's header block in `Client._parse_header_lines`, checking each
header name for whitespace one character at a time with a generator: about 4 µs for the three
headers a stored event carries, a fifth of the projection's CPU under load. This version makes
the same check with one regular expression (`\\s` matches exactly what `str.isspace` accepts);
`tests/test_projection.py` checks that both give the same result on any input.
"""

from __future__ import annotations

import re

from nats.aio.client import Client

_WHITESPACE = re.compile(r"\s")
_original = getattr(Client, "_parse_header_lines", None)


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Name: Value` lines to a dict, as nats-py does: names with whitespace or non-ASCII bytes
    and lines without a colon are skipped; values are stripped and decoded leniently."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key) is None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    """Use this parser in every nats-py client of the process (a no-op if nats-py no longer has
    the method it replaces)."""
    if _original is not None:
        Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]


def original() -> object:
    """nats-py's own parser (for the equivalence test), or None."""
    return _original
