"""SYNC completions come from a JetStream consumer of the terminal events (service/completions.py):
what it delivers is stored by construction, so no confirming read is needed; a lost consumer is
made anew and the waits it served still end with their stored result. It is followed only while
waits need it: made by the first, gone once none has needed it for a while."""

import asyncio
import itertools

import nats.errors

from spear.core.eventstore import StoreUnavailable
from tests.conftest import invoke_body


async def _until(condition, timeout_s: float = 5.0) -> bool:
    """Whether `condition()` came true within `timeout_s`."""
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def _completion_consumers(spear, client) -> list[str]:
    """The consumers on the executions stream that follow the terminal events."""
    terminal = sorted(spear.names.terminal_events())
    names = []
    for info in await client.jetstream().consumers_info(spear.names.stream):
        if sorted(info.config.filter_subjects or []) == terminal:
            names.append(info.name)
    return names


async def test_sync_results_arrive_through_the_completion_consumer(spear, client):
    completions = spear.service.completions
    first, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=6))
    assert first["success"]  # the first SYNC call made the consumer
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


async def test_a_gateway_that_only_accepts_async_calls_follows_no_completions(spear, client):
    ids = []
    for value in range(5):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=value))
        ids.append(reply["execution_id"])
    for execution_id in ids:
        await spear.status_until(client, execution_id, lambda s: s["result"]["status"] == "EXECUTION_STATUS_COMPLETED")

    assert spear.service.completions.consumer == ""
    assert await _completion_consumers(spear, client) == []  # no terminal event is sent to it


async def test_the_consumer_goes_when_unneeded_and_comes_back_for_the_next_wait(spear, client):
    completions = spear.service.completions
    completions.idle_s = 0.3
    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=1))
    assert reply["result"]["result"] == 1
    first = completions.consumer
    assert await _completion_consumers(spear, client) == [first]

    for _ in range(100):  # idle for 0.3 s: unsubscribed; the server drops the consumer after INACTIVE_S
        if not completions.consumer and not await _completion_consumers(spear, client):
            break
        await asyncio.sleep(0.05)
    assert completions.consumer == "" and await _completion_consumers(spear, client) == []

    reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", ms=100))
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and reply["result"]["result"] == 100
    assert completions.consumer not in ("", first)


async def test_a_long_wait_keeps_the_consumer_past_its_idle_time(spear, client):
    completions = spear.service.completions
    completions.idle_s = 0.1
    call = asyncio.create_task(spear.call(client, "invoke_function", invoke_body("sleep", ms=700), timeout=10))
    assert await _until(lambda: completions.live)
    made = completions.consumer
    await asyncio.sleep(0.4)  # four idle times
    assert completions.consumer == made  # not retired while the wait went on
    reply, _ = await call
    # The result came through it, not from the deadline's read of the log (which would come only
    # after the function's timeout, past the call's).
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and reply["result"]["result"] == 700


async def test_a_gateway_whose_completion_consumer_is_deleted_still_answers(spear, client):
    completions = spear.service.completions
    await spear.call(client, "invoke_function", invoke_body("echo", value="first"))
    lost = completions.consumer
    await client.jetstream().delete_consumer(spear.names.stream, lost)

    # Stored while no consumer follows: the one made anew resumes after the last delivery.
    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="again"), timeout=15)

    assert reply["success"] and reply["result"]["result"] == "again"
    # (under load the answer may come first from the wait's read of the log: CI saw the old name)
    assert await _until(lambda: completions.consumer and completions.consumer != lost, timeout_s=10)
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


async def test_a_wait_whose_consumer_cannot_be_made_reads_the_log_until_it_is(spear, client, monkeypatch):
    completions = spear.service.completions
    make = completions._make
    failures = [nats.errors.TimeoutError(), nats.errors.NoRespondersError()]  # what an election gives

    async def flaky_make() -> None:
        if failures:
            raise failures.pop(0)
        await make()

    monkeypatch.setattr(completions, "_make", flaky_make)
    reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", ms=50))
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and reply["result"]["result"] == 50
    for _ in range(100):  # tried again in the background while the wait needed it
        if completions.live:
            break
        await asyncio.sleep(0.05)
    assert completions.live and not failures


async def test_a_wait_whose_consumer_is_never_made_reads_the_log_to_the_end(spear, client, monkeypatch):
    completions = spear.service.completions

    async def never_made() -> None:
        raise nats.errors.TimeoutError()

    monkeypatch.setattr(completions, "_make", never_made)
    for ms in (0, 300):  # ended before the first read of the log, and after a few
        reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", ms=ms))
        assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and reply["result"]["result"] == ms
    assert not completions.live


async def test_a_cancel_whose_consumer_cannot_be_made_reads_how_it_ended(spear, client, monkeypatch):
    completions = spear.service.completions

    async def never_made() -> None:
        raise nats.errors.TimeoutError()

    monkeypatch.setattr(completions, "_make", never_made)
    accepted, _ = await spear.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=20000))
    execution_id = accepted["execution_id"]
    await spear.status_until(client, execution_id, lambda s: s["result"]["status"] == "EXECUTION_STATUS_RUNNING")

    cancel, _ = await spear.call(client, "cancel_execution", {"execution_id": execution_id})

    assert cancel["success"] is True and cancel["final_status"] == "EXECUTION_STATUS_CANCELLED", cancel
    assert not completions.live


async def test_concurrent_waits_share_one_attempt_at_making_the_consumer(spear, client, monkeypatch):
    completions = spear.service.completions
    attempts = []

    async def slow_failure() -> None:  # a cluster electing its meta leader: the request times out
        attempts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.4)
        raise nats.errors.TimeoutError()

    monkeypatch.setattr(completions, "_make", slow_failure)
    began = asyncio.get_running_loop().time()
    calls = [spear.call(client, "invoke_function", invoke_body("echo", value=i)) for i in range(10)]
    replies = await asyncio.gather(*calls)
    took = asyncio.get_running_loop().time() - began

    assert [reply["result"]["result"] for reply, _ in replies] == list(range(10))  # from the log
    # One attempt for all ten, then retries in the background (every MAKE_RETRY_S): one after
    # another, ten attempts would have held the last call's append for four seconds.
    assert attempts and attempts[0] - began < 0.2 and took < 2.0, (attempts, took)
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(attempts))  # never two at once


async def test_a_consumer_made_while_stopping_is_not_kept(spear, client, monkeypatch):
    completions = spear.service.completions
    make = completions._make

    async def slow_make() -> None:
        await asyncio.sleep(0.3)
        await make()

    monkeypatch.setattr(completions, "_make", slow_make)
    following = asyncio.create_task(completions.following())
    await asyncio.sleep(0.1)
    await completions.stop()
    assert await following is False
    await asyncio.sleep(0.5)
    assert not completions.live and await completions.following() is False  # stopped for good


async def test_a_read_of_the_log_that_fails_while_waiting_is_tried_again(spear, client, monkeypatch):
    completions = spear.service.completions
    store = spear.service.store
    last = store.last
    failures = [StoreUnavailable("JetStream did not answer: TimeoutError")] * 2

    async def never_made() -> None:
        raise nats.errors.TimeoutError()

    async def flaky_last(execution_id: str):
        if failures:
            raise failures.pop()
        return await last(execution_id)

    monkeypatch.setattr(completions, "_make", never_made)
    monkeypatch.setattr(store, "last", flaky_last)
    reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", ms=100))
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED" and not failures
