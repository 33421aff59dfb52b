"""A slow statistics scan's answer is kept in the state bucket: a gateway that starts later (a
restart, another gateway) answers GetStats from it at once instead of scanning first (a scan of
a million executions takes ~30 s, longer than a client waits), and a scan behind that answer
brings it up to date. Real parts: two services on one nats-server."""

from contextlib import AsyncExitStack

from spear.aio import poll_until
from spear.cli import components
from spear.core.contract import GetStatsRequest
from spear.jetstream import directget
from spear.jetstream.connection import connect
from spear.service import views
from tests.conftest import invoke_body


async def test_a_gateway_that_starts_later_answers_from_the_kept_scan_then_from_its_own(spear, client, monkeypatch):
    monkeypatch.setattr(views, "EXACT_BELOW_S", 0.0)  # every scan counts as slow: its answer is kept
    for n in range(3):
        await spear.call(client, "invoke_function", invoke_body("echo", value=n))
    await spear.caught_up()
    assert (await spear.service.stats(GetStatsRequest())).service_stats.total_executions == 3
    value = await directget.kv_value(spear.nc, spear.names.state_bucket, spear.names.tally_key(0), 5)
    kept = views.decode_kept(value or b"")
    assert kept is not None and kept[2].total == 3

    await spear.call(client, "invoke_function", invoke_body("echo", value=3))  # after the kept scan
    await spear.caught_up()
    async with AsyncExitStack() as stack:
        nc = await connect(spear.settings, "a-later-gateway")
        stack.push_async_callback(nc.close)
        later = await components.start_service(stack, nc, spear.settings)
        first = await later.stats(GetStatsRequest())
        assert first.service_stats.total_executions == 3  # the kept answer, without a scan first
        assert first.execution_stats is not None and first.execution_stats.completed_executions == 3

        async def counted() -> int:
            return (await later.stats(GetStatsRequest())).service_stats.total_executions

        assert await poll_until(counted, lambda total: total == 4, timeout_s=5) == 4  # a scan ran behind it
