"""SYNC completions come from a JetStream consumer of the terminal events (service/completions.py):
what it delivers is stored by construction, so no confirming read is needed; a lost consumer is
made anew and the waits it served still end with their stored result."""

import asyncio

from tests.conftest import invoke_body


async def test_sync_results_arrive_through_the_completion_consumer(spear, client):
    completions = spear.service.completions
    js = client.jetstream()
    info = await js.consumer_info(spear.names.stream, completions.consumer)
    assert sorted(info.config.filter_subjects or []) == sorted(spear.names.terminal_events())
    before = info.delivered.stream_seq

    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=7))

    assert reply["success"] and reply["result"]["result"] == 7
    terminal = await spear.service.store.last(reply["execution_id"])
    assert terminal is not None and terminal.event.kind == "completed"
    info = await js.consumer_info(spear.names.stream, completions.consumer)
    assert before < terminal.seq <= info.delivered.stream_seq  # the consumer delivered it
    assert not completions.waiters  # the wait was resolved and forgotten


async def test_a_gateway_whose_completion_consumer_is_deleted_still_answers(spear, client):
    completions = spear.service.completions
    lost = completions.consumer
    await client.jetstream().delete_consumer(spear.names.stream, lost)

    # Stored while no consumer follows: the one made anew resumes after the last delivery.
    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="again"), timeout=15)

    assert reply["success"] and reply["result"]["result"] == "again"
    assert completions.consumer and completions.consumer != lost
    for _ in range(3):  # and it keeps serving
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=1))
        assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED"


async def test_many_concurrent_sync_calls_each_get_their_own_result(spear, client):
    calls = [spear.call(client, "invoke_function", invoke_body("echo", value=i)) for i in range(50)]
    replies = await asyncio.gather(*calls)
    assert [reply["result"]["result"] for reply, _ in replies] == list(range(50))


# --- status reads: the projection's state (one direct get), topped up from the log -------------


async def test_status_right_after_a_sync_reply_is_the_terminal_one(spear, client):
    for value in range(10):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=value))
        status, _ = await spear.call(client, "get_execution_status", {"execution_id": reply["execution_id"]})
        assert status["found"] and status["result"]["status"] == "EXECUTION_STATUS_COMPLETED"
        assert status["result"]["result"] == value


async def test_status_tops_up_a_projection_that_lags_behind_the_log(spear, client):
    accepted, _ = await spear.call(client, "invoke_function", invoke_body("sleep", "ASYNC", ms=300))
    execution_id = accepted["execution_id"]
    await spear.status_until(client, execution_id, lambda s: s["result"]["status"] == "EXECUTION_STATUS_RUNNING")
    await spear.caught_up()
    await spear.projection.stop()  # the state bucket now says RUNNING for good
    projected = await spear.service.projected_state(execution_id)
    assert projected is not None and projected.status == "EXECUTION_STATUS_RUNNING"

    status, _ = await spear.status_until(
        client, execution_id, lambda s: s["result"]["status"] != "EXECUTION_STATUS_RUNNING"
    )

    assert status["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and status["result"]["result"] == 300
    unknown, _ = await spear.call(client, "get_execution_status", {"execution_id": "never-stored"})
    assert unknown["found"] is False
