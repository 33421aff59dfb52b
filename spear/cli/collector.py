"""Python's cyclic garbage collector, set for a long-running component once it serves.

Every component freezes what start-up made (modules, settings, connections): the collector's
full collections never walk it again. The projection also collects young objects 30 times less
often (`FOLDING`): it keeps recent executions' states alive for a while, so with CPython's
default (a young collection every 700 net allocations) each young collection walked thousands of
survivors, over and over: ~20 µs of its ~105 µs of CPU per ASYNC execution (docs/performance.md,
fourteenth round). Components that answer callers keep the default: a young collection of 20,000
objects is a pause that showed in the SYNC tail (sixth round). Memory is not at stake: reference
counting frees everything that is not in a cycle at once, and cycles are still collected, later.
"""

from __future__ import annotations

import gc

FOLDING = (20_000, 20)  # net allocations per young collection, young collections per middle one


def settle_collector(young: tuple[int, int] | None = None) -> None:
    """Freeze what exists now (start-up's objects); with `young`, collect young objects that often."""
    gc.collect()  # start-up's garbage, before it would be frozen with the rest
    gc.freeze()
    if young is not None:
        gc.set_threshold(*young, gc.get_threshold()[2])
