"""The projection: every event folded into the state bucket, idempotently, rebuildable from the log."""

import msgspec

from spear.core.enums import ExecutionStatus
from spear.core.state import fold
from spear.projection.projection import Projection, rebuild
from spear.service.views import scan_states
from tests.conftest import has_status, invoke_body


async def _states(spear) -> dict[str, dict]:
    states = await scan_states(spear.nc, spear.names.state_bucket)
    return {state.execution_id: msgspec.to_builtins(state) for state in states}


async def test_bucket_holds_the_fold_of_each_execution_history(spear, client):
    ids = []
    for function, params in (("echo", {"value": 1}), ("fail", {"message": "x"}), ("sleep", {"ms": 10})):
        reply, _ = await spear.call(client, "invoke_function", invoke_body(function, **params))
        ids.append(reply["execution_id"])
    await spear.caught_up()
    states = await _states(spear)
    for execution_id in ids:
        from_log = fold(await spear.service.store.history(execution_id))
        assert states[execution_id] == msgspec.to_builtins(from_log)
    statuses = [states[i]["status"] for i in ids]
    assert statuses == [ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.COMPLETED]


async def test_rebuilt_projection_gives_the_same_state(spear, client):
    for n in range(5):
        await spear.call(client, "invoke_function", invoke_body("calculate_fibonacci", n=n))
    reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=50))
    await spear.status_until(client, reply["execution_id"], has_status(ExecutionStatus.COMPLETED))
    await spear.caught_up()
    before = await _states(spear)
    assert len(before) == 6
    await spear.projection.stop()
    await rebuild(spear.nc, spear.settings)
    assert await _states(spear) == {}  # thrown away
    replayed = Projection(spear.nc, spear.settings)
    await replayed.start()
    try:
        await spear.caught_up(replayed)
        assert await _states(spear) == before
    finally:
        await replayed.stop()


async def test_reapplying_the_whole_log_changes_nothing(spear, client):
    """A second projection over the same bucket (a redelivery of everything) is a no-op."""
    await spear.call(client, "invoke_function", invoke_body("echo", value="x"))
    await spear.caught_up()
    before = await _states(spear)
    js = spear.nc.jetstream()
    await js.delete_consumer(spear.names.stream, spear.names.projection_consumer)
    second = Projection(spear.nc, spear.settings)
    await second.start()
    try:
        await spear.caught_up(second)
        assert await _states(spear) == before
    finally:
        await second.stop()
