"""Python's cyclic garbage collector, set for a long-running component once it serves.

Why: under load the default thresholds (a young collection every 700 net allocations) cost a
component a fifth of its CPU. The projection keeps recent executions' states alive for a while,
so each young collection walks thousands of survivors, over and over: ~20 µs of its ~105 µs per
ASYNC execution went to the collector (docs/performance.md, fourteenth round). Collecting young
objects 30 times less often lets most of them die before a collection looks at them; freezing
what start-up made (modules, settings, connections) keeps full collections off it for good.
Memory is not at stake: reference counting frees everything that is not in a cycle at once, and
cycles are still collected, only later.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # net allocations between young collections (CPython's default: 700)
MIDDLE_EVERY = 20  # young collections per middle one (default 10)


def settle_collector() -> None:
    """Freeze what exists now (start-up's objects) and collect young objects less often."""
    gc.collect()  # start-up's garbage, before it would be frozen with the rest
    gc.freeze()
    _, _, oldest_every = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_EVERY, oldest_every)
