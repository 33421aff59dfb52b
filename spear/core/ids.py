"""Server-made execution ids: ULIDs (26 Crockford base32 characters) that sort by creation time.

Monotonic within a process: ids made in the same millisecond still sort in creation order.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
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
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))
