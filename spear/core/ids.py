"""Server-made execution ids: ULIDs (26 Crockford base32 characters) that sort by creation time.

Monotonic within a process: ids made in the same millisecond still sort in creation order.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [first + second for first in _ALPHABET for second in _ALPHABET]  # 10 bits -> 2 characters
_SHIFTS = range(120, -1, -10)  # 13 pairs: the 128-bit value, two zero bits ahead of it
_lock = threading.Lock()
_last_ms = 0
_last_random = 0


def new_execution_id() -> str:
    """A new execution id that sorts by creation time."""
    global _last_ms, _last_random
    with _lock:
        now_ms = int(time.time() * 1000)
        if now_ms <= _last_ms:
            now_ms, random = _last_ms, _last_random + 1  # same millisecond: count up
        else:
            random = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up
        _last_ms, _last_random = now_ms, random
    value = (now_ms << 80) | (random & ((1 << 80) - 1))
    return encode(value)


def encode(value: int) -> str:
    """A 128-bit value as 26 Crockford base32 characters, most significant first (two characters
    per table lookup: 1.3 µs where one per lookup took 3.2, in every ASYNC call's accept path)."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def creation_ms(execution_id: str) -> int | None:
    """When a ULID execution id was made (Unix ms, its first 10 characters), or None for an id
    that is not a ULID (a client's own)."""
    if len(execution_id) != 26:
        return None
    ms = 0
    for char in execution_id[:10].upper():
        digit = _ALPHABET.find(char)
        if digit < 0:
            return None
        ms = ms * 32 + digit
    return ms if ms <= LAST_MS else None


LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: later ones are no time a date can hold
