"""SharedReads: callers that come while a read is in flight share it; the next read starts anew;
a caller that gives up does not cancel the read for the others."""

from __future__ import annotations

import asyncio

from spear.aio import SharedReads


async def test_concurrent_callers_share_one_read_and_a_later_one_reads_again():
    calls = 0
    gate = asyncio.Event()

    async def read() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    reads: SharedReads[int] = SharedReads()
    waiting = [asyncio.ensure_future(reads.read("k", read)) for _ in range(20)]
    impatient = asyncio.ensure_future(reads.read("k", read))
    await asyncio.sleep(0)
    impatient.cancel()
    gate.set()
    assert await asyncio.gather(*waiting) == [1] * 20
    assert calls == 1
    await asyncio.sleep(0)  # the finished read is dropped
    assert await reads.read("k", read) == 2
    assert await reads.read("other", read) == 3
