"""The projection: every event folded into the state bucket, idempotently, rebuildable from the log."""

import asyncio
import contextlib
import logging
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass

import hypothesis
import msgspec
import nats.js.api
import nats.js.errors
import pytest
from hypothesis import strategies as st
from nats.aio.msg import Msg

from spear.aio import poll_until
from spear.cli.bench.phases import ReplayNames
from spear.core.config import with_overrides
from spear.core.enums import ExecutionStatus
from spear.core.events import Started
from spear.core.names import Names
from spear.core.state import fold
from spear.jetstream import directget, headers, rawsub, topology
from spear.jetstream.kvwrites import KvWriter, WriteFailed, WrongRevision
from spear.jetstream.pull import stream_sequence
from spear.projection.intake import Arrived
from spear.projection.projection import Projection, rebuild
from spear.service.views import scan_states
from tests.conftest import has_status, invoke_body, start_spear


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


async def test_rebuilt_projection_gives_the_same_state(spear, client, caplog):
    caplog.set_level(logging.INFO, logger="spear.projection.projection")
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
        said = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("projection: replayed 18 events (up to stream sequence ") for m in said), said
    finally:
        await replayed.stop()


async def test_a_projection_whose_consumer_is_deleted_under_it_replays_and_follows_anew(
    settings, client, monkeypatch, caplog
):
    """probe36: `spear projection --rebuild` that failed once it had dropped the read models (a
    metrics port taken) left the running projection on a deleted consumer: it folded nothing,
    said nothing, and every execution listed as pending. It now notices, replays the stream
    into the bucket and follows a consumer made anew."""
    from spear.projection import projection as projection_module

    monkeypatch.setattr(projection_module, "CONSUMER_CHECK_S", 0.3)
    caplog.set_level(logging.WARNING, logger="spear.projection.projection")
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings)
        ids = [
            (await spear.call(client, "invoke_function", invoke_body("echo", value=n)))[0]["execution_id"]
            for n in range(3)
        ]
        await spear.caught_up()
        assert len(await _states(spear)) == 3
        await rebuild(spear.nc, spear.settings)  # (and nothing after it: as if it failed there)
        assert await _states(spear) == {}
        for n in range(2):
            reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=n))
            ids.append(reply["execution_id"])

        async def all_completed() -> bool:
            states = await _states(spear)
            return sorted(states) == sorted(ids) and all(
                state["status"] == ExecutionStatus.COMPLETED for state in states.values()
            )

        await poll_until(all_completed, bool, timeout_s=15, what="every execution projected again")
        assert spear.projection.status().restarts == 1
        assert any("was deleted (a rebuild?)" in r.getMessage() for r in caplog.records), caplog.text
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=9))  # and it follows
        await poll_until(lambda: spear.service.projected_state(reply["execution_id"]), bool, timeout_s=10)


async def test_a_rebuild_keeps_the_expired_markers(spear, client):
    """Retention removed an execution's events: no replay brings its state back, so its marker is
    all that says it existed (status: "expired"; a list cursor naming it goes on where it was).
    Statistics kept from before are dropped with the states (a review)."""
    from spear.projection.retention import expire, expired_marker

    reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=1))
    await spear.caught_up()
    state = await spear.service.execution_state(reply["execution_id"])
    await expire(spear.nc, spear.names, spear.service.state_kv, state, 60, 5.0)
    await spear.projection.stop()
    await spear.service.state_kv.put(spear.names.tally_key(0), b'{"kept": "before"}')  # a slow scan's answer
    await rebuild(spear.nc, spear.settings)
    assert await _states(spear) == {}
    assert await directget.kv_value(spear.nc, spear.names.state_bucket, spear.names.tally_key(0), 5) is None
    marker = await expired_marker(spear.service.state_kv, spear.names, reply["execution_id"])
    assert marker is not None and marker.status == ExecutionStatus.COMPLETED
    status, _ = await spear.call(client, "get_execution_status", {"execution_id": reply["execution_id"]})
    assert status["found"] is False and "expired" in status["message"]


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


async def _kv_last_seq(spear, bucket: str) -> int:
    return (await spear.nc.jetstream().stream_info(f"KV_{bucket}")).state.last_seq


async def test_an_executions_events_folded_in_one_batch_make_one_state_write(settings, client):
    """requested, started and completed arrive milliseconds apart; the linger holds the batch
    until the execution has ended, so its state is written once, not three times."""
    settings = with_overrides(settings, projection={"linger_ms": 1000})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings)
        writes = []

        async def seen(msg: Msg) -> None:
            writes.append(msg.subject)

        sub = await client.subscribe(f"$KV.{spear.names.state_bucket}.>", cb=seen)
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=1))
        assert reply["result"]["status"] == ExecutionStatus.COMPLETED
        await spear.caught_up()
        await client.flush()
        await sub.unsubscribe()
        key = f"$KV.{spear.names.state_bucket}.{spear.names.state_key(reply['execution_id'])}"
        assert writes.count(key) == 1
        states = await _states(spear)
        from_log = fold(await spear.service.store.history(reply["execution_id"]))
        assert states[reply["execution_id"]] == msgspec.to_builtins(from_log)


async def test_sequential_calls_within_the_linger_share_one_batch(settings, client):
    """A batch does not close when its executions have ended, only when the linger is over (or
    it is full): SYNC calls one after another are folded and written together, not one batch
    (a state write, three acks, a pull request) per call."""
    settings = with_overrides(settings, projection={"linger_ms": 1000})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings)
        written: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        async def seen(msg: Msg) -> None:
            written.setdefault(msg.subject, loop.time())

        sub = await client.subscribe(f"$KV.{spear.names.state_bucket}.>", cb=seen)
        replies = []
        for value in (1, 2, 3):
            reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=value))
            assert reply["result"]["status"] == ExecutionStatus.COMPLETED
            replies.append((reply["execution_id"], loop.time()))
        await spear.caught_up()
        await client.flush()
        await sub.unsubscribe()
        times = [written[f"$KV.{spear.names.state_bucket}.{spear.names.state_key(eid)}"] for eid, _ in replies]
        first_reply_at = replies[0][1]
        assert times[0] - first_reply_at > 0.5  # held for the linger although it had ended
        assert max(times) - min(times) < 0.5  # the three written together, in one batch


async def test_the_linger_never_holds_an_event_beyond_its_bound(settings, client):
    """An execution that runs longer than the linger is written while it runs, not at its end."""
    settings = with_overrides(settings, projection={"linger_ms": 100})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings)
        reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=3000))
        execution_id = reply["execution_id"]
        running = None
        while running is None:  # bounded by the test's timeout; the execution ends after 3 s
            state = await spear.service.projected_state(execution_id)
            if state is not None and state.status == ExecutionStatus.RUNNING:
                running = state
            else:
                await asyncio.sleep(0.02)
        status, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
        assert status["result"]["status"] == ExecutionStatus.RUNNING  # it was written before the end
        await spear.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))


async def test_a_redelivered_history_writes_nothing(spear, client):
    """A projection that gets every event again (its consumer made anew over the same bucket)
    finds each state already there: creates are refused, it reads, folds, and writes nothing."""
    ids = []
    for n in range(4):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=n))
        ids.append(reply["execution_id"])
    for execution_id in ids:
        await spear.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
    await spear.caught_up()
    before, last_write = await _states(spear), await _kv_last_seq(spear, spear.names.state_bucket)
    await spear.projection.stop()
    await spear.nc.jetstream().delete_consumer(spear.names.stream, spear.names.projection_consumer)
    again = Projection(spear.nc, spear.settings)
    await again.start()
    try:
        await spear.caught_up(again)
        assert await _kv_last_seq(spear, spear.names.state_bucket) == last_write
        assert await _states(spear) == before
    finally:
        await again.stop()


async def test_a_replay_into_its_own_bucket_equals_the_live_projection(spear, client, monkeypatch):
    """What `spear bench` measures: the stream replayed by a projection of its own (its own
    consumer and bucket, no linger) gives the live projection's states and function stats."""
    from spear.projection import functiontimes

    monkeypatch.setattr(functiontimes, "RECENT_TIMES", 2)  # fewer than the executions of `echo`
    ids = []
    for n in range(3):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=n))
        ids.append(reply["execution_id"])
    await spear.call(client, "invoke_function", invoke_body("fail", message="x"))
    for execution_id in ids:
        await spear.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
    await spear.caught_up()
    live = await _states(spear)
    names = ReplayNames(spear.names.prefix)
    replay = Projection(spear.nc, with_overrides(spear.settings, projection={"linger_ms": 0}), names)
    await replay.start()
    try:
        await spear.caught_up(replay)
        states = await scan_states(spear.nc, names.state_bucket)
        assert {state.execution_id: msgspec.to_builtins(state) for state in states} == live
        assert replay.function_times.stats == spear.projection.function_times.stats  # counts and recent times
    finally:
        await replay.stop()
        await spear.nc.jetstream().delete_stream(f"KV_{names.state_bucket}")


def test_stream_sequence_is_read_from_either_ack_subject_form():
    plain = Msg(_client=None, reply="$JS.ACK.S.C.1.42.7.1700000000.0")  # type: ignore[arg-type]
    with_domain = Msg(_client=None, reply="$JS.ACK.hub.ACCHASH.S.C.1.43.7.1700000000.0.token")  # type: ignore[arg-type]
    assert stream_sequence(plain) == 42 == plain.metadata.sequence.stream
    assert stream_sequence(with_domain) == 43 == with_domain.metadata.sequence.stream


async def test_pipelined_writes_are_compare_and_set(spear):
    """The projection's writer: a create finds no key or is refused, an update needs the revision
    it read; refusals come back as WrongRevision, each write's outcome in order."""
    writer = KvWriter(spear.nc, spear.names.state_bucket, timeout_s=5)
    await writer.start()
    try:
        first = await writer.write([("w.a", b"1", 0), ("w.b", b"1", 0)])
        assert all(isinstance(revision, int) for revision in first)
        second = await writer.write([("w.a", b"2", 0), ("w.b", b"2", first[1]), ("w.a", b"3", first[1])])
        assert isinstance(second[0], WrongRevision) and isinstance(second[2], WrongRevision)
        assert isinstance(second[1], int) and second[1] > first[1]
        kv = await spear.nc.jetstream().key_value(spear.names.state_bucket)
        assert (await kv.get("w.a")).value == b"1" and (await kv.get("w.b")).value == b"2"
    finally:
        await writer.stop()


async def test_a_write_to_no_bucket_fails_with_the_server_s_status(spear):
    writer = KvWriter(spear.nc, "NO_SUCH_BUCKET", timeout_s=5)
    await writer.start()
    try:
        [outcome] = await writer.write([("k", b"1", 0)])
        assert isinstance(outcome, WriteFailed) and str(outcome) == "no reply from the bucket (status 503)"
    finally:
        await writer.stop()


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    st.lists(
        st.sampled_from(
            [b"a", b"B-", b":", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\xff", b"\xe2\x82", b"\x1c", b"\xc2\xa0", b"\x0b"]
        ),
        max_size=16,
    )
)
def test_the_faster_header_parser_gives_what_nats_py_gives(parts):
    raw = b"".join(parts)
    assert headers.parse_header_lines(raw) == headers.original()(raw)  # type: ignore[operator]


@dataclass(frozen=True)
class _SharedNames(Names):
    projection_consumer = "shared"

    @property
    def state_bucket(self) -> str:
        return f"{self.prefix.upper()}_SHARED_STATE"


async def test_an_event_delivered_before_its_requested_is_written_is_not_lost(spear, client, monkeypatch):
    """Two projections on one consumer: the first holds the `requested` in its linger, the second
    is delivered `started` and finds no state. It folds the execution's history from the log
    instead of folding `started` onto nothing (which acknowledged it and left the state PENDING
    while it ran), and the first projection's late create then finds the state and writes nothing."""
    from spear.projection import projection as module

    names = _SharedNames(spear.names.prefix)
    monkeypatch.setattr(module, "IN_HAND", 1)  # the first projection takes one event at a time
    first = Projection(spear.nc, with_overrides(spear.settings, projection={"linger_ms": 1000}), names)
    await first.start()

    async def following() -> object:
        return first.consumer  # made once the replay of what was stored before is over

    await poll_until(following, lambda consumer: consumer is not None, timeout_s=10, interval_s=0.01)
    monkeypatch.undo()
    second = None

    async def held() -> list:
        return first.intake.pending

    async def started_seq(execution_id: str) -> int:
        history = await spear.service.store.history(execution_id)
        return next((stored.seq for stored in history if isinstance(stored.event, Started)), 0)

    async def state(execution_id: str):
        return {s.execution_id: s for s in await scan_states(spear.nc, names.state_bucket)}.get(execution_id)

    try:
        reply, _ = await spear.call(client, "invoke_function", invoke_body("sleep", mode="ASYNC", ms=3000))
        execution_id = reply["execution_id"]
        requested_seq = (await poll_until(held, timeout_s=10, interval_s=0.01))[0].seq  # held for the linger
        second = Projection(spear.nc, with_overrides(spear.settings, projection={"linger_ms": 0}), names)
        await second.start()
        # The worker runs it: `started` is stored, and delivered to the second projection.
        await second.wait(await poll_until(lambda: started_seq(execution_id), bool, timeout_s=10, interval_s=0.01))
        assert first.applied_seq < requested_seq  # the race this test is about did happen
        await first.wait(requested_seq)
        running = await state(execution_id)
        assert running is not None and running.status in (ExecutionStatus.RUNNING, ExecutionStatus.COMPLETED)
        assert running.requested_at and running.started_at
        # Its end goes to either projection.
        ended = await poll_until(lambda: state(execution_id), lambda s: s is not None and s.terminal, timeout_s=10)
        from_log = fold(await spear.service.store.history(execution_id))
        assert msgspec.to_builtins(ended) == msgspec.to_builtins(from_log)
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
        await _drop_projection_of(spear, names)


async def _ended(spear, client, count: int) -> list[str]:
    ids = []
    for n in range(count):
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=n))
        ids.append(reply["execution_id"])
    for execution_id in ids:
        await spear.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
    return ids


async def _replayed_states(spear, names: Names) -> dict[str, dict]:
    return {state.execution_id: msgspec.to_builtins(state) for state in await scan_states(spear.nc, names.state_bucket)}


async def test_a_replay_interrupted_midway_and_started_again_ends_equal(spear, client, monkeypatch):
    """The replay writes ended states as it goes; one that fails after some are written is started
    again from the beginning by the projection's loop, and ends with the live projection's states."""
    from spear.projection import replay as replay_module

    await _ended(spear, client, 6)
    await spear.caught_up()
    live = await _states(spear)
    monkeypatch.setattr(replay_module, "WINDOW", 2)  # several batches of writes
    names = ReplayNames(spear.names.prefix)
    projection = Projection(spear.nc, with_overrides(spear.settings, projection={"linger_ms": 0}), names)
    settle, calls = projection._settle, []

    async def fails_once(states):
        calls.append(len(states))
        if len(calls) == 2:  # the first batch is written: the bucket holds part of the replay
            raise ConnectionError("interrupted")
        await settle(states)

    monkeypatch.setattr(projection, "_settle", fails_once)
    await projection.start()
    try:
        await spear.caught_up(projection)
        assert projection.restarts == 1 and "interrupted" in projection.last_error
        assert len(calls) > 3  # replayed again from the beginning
        assert await _replayed_states(spear, names) == live
    finally:
        await projection.stop()
        await spear.nc.jetstream().delete_stream(f"KV_{names.state_bucket}")


async def test_events_stored_during_a_replay_are_applied_once_after_it(spear, client, monkeypatch):
    """The replay reads up to the stream's end as it began; the durable consumer is made to start
    right after the last event replayed, so what was stored meanwhile is delivered once, by it."""
    await _ended(spear, client, 3)
    await spear.caught_up()
    names = ReplayNames(spear.names.prefix)
    projection = Projection(spear.nc, with_overrides(spear.settings, projection={"linger_ms": 0}), names)
    settle, release = projection._settle, asyncio.Event()

    async def held(states):
        await release.wait()
        await settle(states)

    monkeypatch.setattr(projection, "_settle", held)
    js = spear.nc.jetstream()
    replayed = (await js.stream_info(spear.names.stream)).state.last_seq
    await projection.start()
    try:
        meanwhile = await _ended(spear, client, 3)  # stored while the replay waits to write
        release.set()
        await spear.caught_up()
        await spear.caught_up(projection)
        info = await js.consumer_info(names.stream, names.projection_consumer)
        assert info.config.opt_start_seq == replayed + 1
        last = (await js.stream_info(spear.names.stream)).state.last_seq
        assert info.delivered.stream_seq == last
        assert info.delivered.consumer_seq == last - replayed  # each event after the replay, once
        assert info.num_redelivered == 0
        states = await _replayed_states(spear, names)
        assert states == await _states(spear)
        assert set(meanwhile) <= set(states)
    finally:
        await projection.stop()
        await js.delete_stream(f"KV_{names.state_bucket}")


@pytest.mark.parametrize("hooked", [True, False])
async def test_a_raw_subscription_gets_what_nats_py_would_and_leaves_others_alone(client, monkeypatch, hooked):
    """The replay's subscription is taken out of nats-py's dispatch (or, should nats-py change,
    served by an ordinary callback): the same bytes either way; other subscriptions unaffected."""
    if not hooked:
        monkeypatch.setattr(rawsub, "_hooks", lambda nc: None)
    raw: list[tuple[bytes, bytes, bytes, bytes]] = []
    ordinary: list[Msg] = []

    async def seen(msg: Msg) -> None:
        ordinary.append(msg)

    subject = f"raw.{uuid.uuid4().hex}"
    sub = await rawsub.subscribe_raw(client, subject, lambda *parts: raw.append(parts))
    other = await client.subscribe(subject, cb=seen)
    await client.publish(subject, b"body", reply="the.reply", headers={"Nats-Msg-Id": "x"})
    await client.publish(subject, b"plain")
    await poll_until(lambda: asyncio.sleep(0, len(raw) + len(ordinary)), lambda n: n == 4, timeout_s=5, interval_s=0.01)
    assert raw[0][:3] == (subject.encode(), b"the.reply", b"body")
    assert raw[0][3].startswith(b"NATS/1.0") and b"Nats-Msg-Id: x" in raw[0][3]
    assert raw[1] == (subject.encode(), b"", b"plain", b"")
    assert [(m.data, m.reply, m.headers) for m in ordinary] == [
        (b"body", "the.reply", {"Nats-Msg-Id": "x"}),
        (b"plain", "", None),
    ]
    await sub.unsubscribe()
    await other.unsubscribe()


async def test_an_event_after_requested_found_over_a_purge_marker_is_folded_onto_the_log(spear, client):
    """An id used again after expiry: its state key's last entry is the purge marker. An event that
    is not the execution's first, met with no state, is folded onto what the log holds before it
    (its `requested` may sit in another projection's batch), not onto nothing."""
    body = {**invoke_body("echo", value=2), "execution_id": "reuse-x"}
    reply, _ = await spear.call(client, "invoke_function", body)
    assert reply["success"], reply
    await spear.caught_up()
    await spear.projection.kv.purge(spear.names.state_key("reuse-x"))
    started = next(s for s in await spear.service.store.history("reuse-x") if s.event.kind == "started")
    state, revision = await spear.projection._load("reuse-x", Arrived(started.event, started.seq, None))
    assert state is not None and state.status == ExecutionStatus.PENDING and revision > 0  # `requested` folded
    assert await spear.projection._store({"reuse-x": [Arrived(started.event, started.seq, None)]}) == {}
    stored, _ = await spear.projection._read("reuse-x")
    assert stored is not None and stored.status == ExecutionStatus.RUNNING  # `started` applied, not lost


@pytest.mark.parametrize("grace_s", [5.0, 0.05], ids=["applied at stop", "handed back"])
async def test_a_projection_stopped_with_events_in_hand_leaves_none_to_the_ack_wait(
    settings, client, monkeypatch, grace_s
):
    """Events received and not applied when a projection stops (here: held by a long linger) are
    applied then, the linger cut short; any it has no time for are handed back, so the next
    projection applies them at once. Neither waits for the consumer's ack wait (30 s, in which a
    restarted spear listed an execution that had ended as RUNNING: probe26)."""
    from spear.projection import projection as projection_module

    monkeypatch.setattr(projection_module, "STOP_GRACE_S", grace_s)
    lingering = with_overrides(settings, projection={"linger_ms": 1000})
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, lingering)
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=4))
        assert reply["result"]["status"] == ExecutionStatus.COMPLETED
        execution_id = reply["execution_id"]
        assert len(spear.projection.intake) > 0  # (the linger holds its events)
        if not grace_s > 1:  # no time to apply them: the linger goes on past the grace
            monkeypatch.setattr(spear.projection.intake, "hurry", lambda: None)
        await spear.projection.stop()
        state = await spear.service.projected_state(execution_id)
        if grace_s > 1:
            assert state is not None and state.status == ExecutionStatus.COMPLETED  # applied as it stopped
            return
        assert state is None  # none was applied: handed back
        second = Projection(spear.nc, settings)
        await second.start()
        stack.push_async_callback(second.stop)
        state = await poll_until(lambda: spear.service.projected_state(execution_id), bool, timeout_s=5)
        assert state.status == ExecutionStatus.COMPLETED


async def test_a_projection_stopped_while_its_replay_ends_starts_no_consumer(spear, monkeypatch):
    """review38: a stop during a replay that the loop's cancellation does not reach (Python 3.11's
    wait_for can swallow one that meets a result) started the consumer after the stop: a
    projection stopped, still pulling and folding. Here the consumer's making swallows the stop's
    cancellations, as such a wait_for would, and finishes after the stop."""
    real = topology.ensure_projection_consumer
    reached, release = asyncio.Event(), asyncio.Event()

    async def swallowing(*args, **kwargs) -> str:
        reached.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(topology, "ensure_projection_consumer", swallowing)
    names = ReplayNames(spear.names.prefix)
    projection = Projection(spear.nc, spear.settings, names)
    await projection.start()
    try:
        await asyncio.wait_for(reached.wait(), 10)  # the replay is over: the consumer is being made
        stopping = asyncio.create_task(projection.stop())
        await asyncio.sleep(0.2)  # (the stop has cancelled the loop, in vain)
        release.set()
        await asyncio.wait_for(stopping, 10)
        await asyncio.sleep(0.2)  # the loop, on from the consumer's making
        assert projection.consumer is None  # none started after the stop
    finally:
        if projection.consumer is not None:
            await projection.consumer.stop()
        await _drop_projection_of(spear, names)


async def test_a_projection_that_stops_does_not_start_over_when_its_consumer_is_then_seen_gone(spear):
    """review38: the consumer watch, seeing the consumer gone as the projection stops (its second
    look comes just then), replayed the stream and followed anew after the stop."""
    names = ReplayNames(spear.names.prefix)
    projection = Projection(spear.nc, spear.settings, names)
    await projection.start()
    try:
        await spear.caught_up(projection)
        await projection.stop()
        await projection._start_over()  # what the watch does once it has seen the consumer gone twice
        assert projection._loop_task is not None and projection._loop_task.done()
        assert projection.restarts == 0
    finally:
        await _drop_projection_of(spear, names)


async def test_events_a_crashed_projection_held_are_folded_by_another_within_seconds(spear, client):
    """probe42: a projection killed with events in hand left lists and statistics wrong (ended
    executions listed RUNNING) for the consumer's ack wait, 30 s, before the events came again.
    The ack wait is 10 s now: a batch takes milliseconds, and a redelivered event folds to nothing."""
    names = _SharedNames(spear.names.prefix)
    first = Projection(spear.nc, spear.settings, names)
    first.intake.linger_s = 3600.0  # it holds what it is delivered
    await first.start()
    await poll_until(lambda: asyncio.sleep(0, first.consumer), lambda c: c is not None, timeout_s=10)
    second = None
    try:
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=1))
        execution_id = reply["execution_id"]
        await spear.status_until(client, execution_id, has_status(ExecutionStatus.COMPLETED))
        await poll_until(lambda: asyncio.sleep(0, len(first.intake.pending)), lambda n: n >= 3, timeout_s=10)
        # The crash: it pulls no more and acknowledges nothing, and its events stay in its hands.
        assert first._loop_task is not None and first.consumer is not None
        first._loop_task.cancel()
        await first.consumer.stop()
        first.intake.pending.clear()  # (not handed back at its stop below: a killed process says nothing)
        began = time.monotonic()
        second = Projection(spear.nc, with_overrides(spear.settings, projection={"linger_ms": 0}), names)
        await second.start()

        async def state():
            return {s.execution_id: s for s in await scan_states(spear.nc, names.state_bucket)}.get(execution_id)

        ended = await poll_until(state, lambda s: s is not None and s.terminal, timeout_s=20, interval_s=0.1)
        assert ended.status == ExecutionStatus.COMPLETED
        assert time.monotonic() - began < 12, time.monotonic() - began  # the ack wait (10 s), not 30 s
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
        await _drop_projection_of(spear, names)


async def _drop_projection_of(spear, names: Names) -> None:
    """A test's own projection gone: its consumer (if one was made) and its state bucket."""
    js = spear.nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(names.stream, names.projection_consumer)
    await js.delete_stream(f"KV_{names.state_bucket}")


async def test_writes_the_state_bucket_does_not_take_are_said_once_a_batch_as_passing(spear, client, caplog):
    """verify60: while the state bucket's leader was elected, the projection logged an ERROR per
    execution (1,004 lines). Now one line per batch, a WARNING when nothing took the writes (a
    passing state), and the states are written once the bucket takes writes again."""
    js = client.jetstream()
    bucket = f"KV_{spear.names.state_bucket}"
    config = (await js.stream_info(bucket)).config
    await js.update_stream(nats.js.api.StreamConfig.from_response({**config.as_dict(), "subjects": ["nowhere.>"]}))
    caplog.set_level(logging.WARNING, logger="spear.projection.projection")
    try:
        ids = [
            (await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=n)))[0]["execution_id"]
            for n in range(20)
        ]
        await poll_until(
            lambda: asyncio.sleep(0, [r for r in caplog.records if "not applied" in r.getMessage()]), bool, timeout_s=10
        )
        await asyncio.sleep(0.5)  # (more batches, if any)
    finally:
        await js.update_stream(config)
    said = [r for r in caplog.records if "not applied" in r.getMessage()]
    assert said and all(r.levelno == logging.WARNING for r in said), [r.getMessage() for r in said]
    assert len(said) < 20 / 2, [r.getMessage() for r in said]  # (batches, not executions)
    assert "execution(s) not applied" in said[0].getMessage()

    async def written() -> bool:  # (redelivered a second after each nak)
        states = {state.execution_id: state for state in await scan_states(spear.nc, spear.names.state_bucket)}
        return all(i in states and states[i].status == ExecutionStatus.COMPLETED for i in ids)

    await poll_until(written, bool, timeout_s=15)


async def test_a_live_projection_replays_when_a_rebuild_beside_it_made_its_consumer_anew(
    spear, client, monkeypatch, caplog
):
    """probe61: a rebuild drops the consumer and makes it again ~40 ms later, at the end of its
    replay; a live projection, which looked for it gone twice 5 s apart, never saw it and went on
    with what it kept from before (the doc said it replays). A consumer made anew since it was
    followed is now as sure a sign as one gone twice: it replays, then follows the new one."""
    from spear.projection import projection as module

    monkeypatch.setattr(module, "CONSUMER_CHECK_S", 0.2)
    live = Projection(spear.nc, spear.settings)  # (started with the check's new pace)
    await spear.projection.stop()
    await live.start()
    again = None
    try:
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=1))
        await spear.caught_up(live)
        await rebuild(spear.nc, spear.settings)
        again = Projection(spear.nc, spear.settings)  # `spear projection --rebuild`: replays, makes it anew
        await again.start()
        await poll_until(lambda: asyncio.sleep(0, live.restarts), bool, timeout_s=5)
        assert "consumer was deleted" in live.last_error
        assert any("replaying the stream" in r.getMessage() for r in caplog.records)
        await again.stop()  # (two projections share the consumer's events: the live one alone now)
        later, _ = await spear.call(client, "invoke_function", invoke_body("echo", mode="ASYNC", value=2))
        await spear.status_until(client, later["execution_id"], has_status(ExecutionStatus.COMPLETED))
        await spear.caught_up(live)
        states = await _states(spear)
        assert {reply["execution_id"], later["execution_id"]} <= set(states)
    finally:
        await live.stop()
        if again is not None:
            await again.stop()
