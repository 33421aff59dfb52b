"""The collector setting a long-running component takes once it serves (spear/cli/collector.py)."""

from __future__ import annotations

import asyncio
import gc
import signal
import weakref
from collections.abc import Iterator

import pytest

from spear.cli.collector import FOLDING, settle_collector
from spear.cli.run import Lifetime


@pytest.fixture
def restored_collector() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


async def _serving(young: tuple[int, int] | None) -> Lifetime:
    life = Lifetime()
    serving = asyncio.create_task(life.serve(young))
    await asyncio.sleep(0)
    life._signalled(signal.SIGTERM)
    await asyncio.wait_for(serving, 5)
    return life


@pytest.mark.usefixtures("restored_collector")
async def test_a_component_that_serves_freezes_what_start_up_made_and_keeps_the_default_pace() -> None:
    made_at_start_up = [[n] for n in range(1000)]
    default = gc.get_threshold()
    await _serving(None)
    assert gc.get_threshold() == default  # components that answer callers: no longer pauses
    assert gc.get_freeze_count() > len(made_at_start_up)  # start-up's objects: no collection walks them
    assert not any(made is o for o in gc.get_objects() for made in made_at_start_up[:1])


@pytest.mark.usefixtures("restored_collector")
async def test_the_projection_collects_young_objects_less_often() -> None:
    oldest_every = gc.get_threshold()[2]
    await _serving(FOLDING)
    assert gc.get_threshold() == (*FOLDING, oldest_every)
    assert FOLDING[0] > 700


@pytest.mark.usefixtures("restored_collector")
def test_cycles_made_while_serving_are_still_collected() -> None:
    settle_collector(FOLDING)

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None
