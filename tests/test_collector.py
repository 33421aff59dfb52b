"""The collector setting a long-running component takes once it serves (spear/cli/collector.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from spear.cli.collector import MIDDLE_EVERY, YOUNG_THRESHOLD, settle_collector
from spear.cli.run import Lifetime


@pytest.fixture
def restored_collector() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restored_collector")
async def test_a_component_that_serves_collects_young_objects_less_often_and_freezes_start_up() -> None:
    made_at_start_up = [[n] for n in range(1000)]
    oldest_every = gc.get_threshold()[2]
    life = Lifetime()
    serving = asyncio.create_task(life.serve())
    await asyncio.sleep(0)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, MIDDLE_EVERY, oldest_every)
    assert gc.get_freeze_count() > len(made_at_start_up)  # start-up's objects: no collection walks them
    assert not any(made is o for o in gc.get_objects() for made in made_at_start_up[:1])
    life._signalled()
    await asyncio.wait_for(serving, 5)


@pytest.mark.usefixtures("restored_collector")
def test_cycles_made_while_serving_are_still_collected() -> None:
    settle_collector()

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None
