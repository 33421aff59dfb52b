"""The event store's guarantees against a real stream, and the topology applied as data."""

import asyncio
import time

import pytest

from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import Completed, Failed, Requested, Started, StoredResult, decode_event
from spear.jetstream import topology
from spear.jetstream.errors import append_refusal
from spear.jetstream.pull import Delivery, PullConsumer
from spear.jetstream.store import AppendConflict, JetStreamStore, StoreError
from spear.telemetry import tracing


def _common(execution_id):
    return dict(execution_id=execution_id, task_id="demo", function_name="echo", at="2026-01-01T00:00:00.000Z")


async def _store(client, settings, names):
    await topology.ensure_base(client, names)
    return JetStreamStore(client, names)


async def test_topology_is_applied_idempotently_and_repaired(client, settings, names):
    await topology.ensure_base(client, names)
    await topology.ensure_base(client, names)  # a second start changes nothing and does not fail
    info = await topology.api_request(client, f"STREAM.INFO.{names.stream}", None, 5)
    assert info["config"]["subjects"] == [f"{names.prefix}.append.>"]
    assert info["config"]["subject_transform"]["dest"] == f"{names.prefix}.exec.>"
    assert info["config"]["allow_direct"] is True and info["config"]["storage"] == "file"
    drifted = {**info["config"], "duplicate_window": 5_000_000_000}
    await topology.api_request(client, f"STREAM.UPDATE.{names.stream}", drifted, 5)
    await topology.ensure_base(client, names)
    info = await topology.api_request(client, f"STREAM.INFO.{names.stream}", None, 5)
    assert info["config"]["duplicate_window"] == 120_000_000_000
    durable = await topology.ensure_worker_consumer(client, names, "demo", 30_000)
    durable_again = await topology.ensure_worker_consumer(client, names, "demo", 45_000)
    consumer = await topology.api_request(client, f"CONSUMER.INFO.{names.stream}.{durable}", None, 5)
    assert durable == durable_again == "worker-demo"
    assert consumer["config"]["ack_wait"] == 45_000_000_000  # raised
    await topology.ensure_worker_consumer(client, names, "demo", 3_000)  # a worker that would lower it
    consumer = await topology.api_request(client, f"CONSUMER.INFO.{names.stream}.{durable}", None, 5)
    assert consumer["config"]["ack_wait"] == 45_000_000_000  # running workers beat every 15 s: it stays
    assert consumer["config"]["filter_subject"] == f"{names.prefix}.exec.demo.*.requested"


async def test_a_consumer_made_to_start_at_a_sequence_takes_a_new_config_where_it_started(client, names):
    """review44: a projection consumer made after a replay starts at a sequence; the first config
    change of an upgrade (its ack wait) was refused ("deliver policy can not be updated"),
    retried for 60 s, and the projection failed every start."""
    await topology.ensure_base(client, names)
    made = await topology.ensure_projection_consumer(client, names, start_seq=7)
    before = await topology.api_request(client, f"CONSUMER.INFO.{names.stream}.{made}", None, 5)
    older = {**before["config"], "ack_wait": 30_000_000_000}  # as an older release made it
    await topology.api_request(
        client, f"CONSUMER.CREATE.{names.stream}.{made}", {"stream_name": names.stream, "config": older}, 5
    )
    await asyncio.wait_for(topology.ensure_projection_consumer(client, names), 10)  # (start_seq 0: "all")
    after = await topology.api_request(client, f"CONSUMER.INFO.{names.stream}.{made}", None, 5)
    assert after["config"]["ack_wait"] == 10_000_000_000
    assert (after["config"]["deliver_policy"], after["config"]["opt_start_seq"]) == ("by_start_sequence", 7)


async def test_subscribers_see_stored_events_once_never_duplicates_or_rejected_appends(client, settings, names):
    store = await _store(client, settings, names)
    seen = []

    async def collect(msg):
        seen.append((msg.subject, decode_event(msg.data)))

    await client.subscribe(f"{names.prefix}.exec.>", cb=collect)
    await client.flush()
    requested = Requested(**_common("E1"), execution_mode=ExecutionMode.ASYNC)
    first = await store.append(requested, expect_last_seq=0, msg_id="E1:requested")
    again = await store.append(requested, msg_id="E1:requested")  # a re-append: harmless
    assert again.duplicate and again.seq == first.seq
    started = await store.append(Started(**_common("E1"), attempt=1), expect_last_seq=first.seq)
    done = Completed(**_common("E1"), attempt=1, result=StoredResult(status=ExecutionStatus.COMPLETED, result=1))
    await store.append(done, expect_last_seq=started.seq)
    late = Failed(**_common("E1"), attempt=1, result=StoredResult(status=ExecutionStatus.FAILED))
    with pytest.raises(AppendConflict) as conflict:
        await store.append(late, expect_last_seq=started.seq)  # a second terminal event
    assert conflict.value.last_seq == started.seq + 1
    with pytest.raises(AppendConflict):  # the same id cannot be requested again under another task
        await store.append(
            Requested(**{**_common("E1"), "task_id": "other"}, execution_mode=ExecutionMode.ASYNC), expect_last_seq=0
        )
    # A last event, of another execution: stored events are re-published in stream order, so
    # anything wrongly sent for E1 would have come before it.
    await store.append(Requested(**_common("E2"), execution_mode=ExecutionMode.ASYNC), expect_last_seq=0)
    for _ in range(250):
        if seen and seen[-1][1].execution_id == "E2":
            break
        await asyncio.sleep(0.02)
    assert seen.pop()[1].execution_id == "E2"
    kinds = [subject.rsplit(".", 1)[-1] for subject, _ in seen]
    assert kinds == ["requested", "started", "completed"]
    assert seen[0][0] == f"{names.prefix}.exec.demo.E1.requested"


async def test_history_and_last_read_one_execution_in_order(client, settings, names):
    store = await _store(client, settings, names)
    assert await store.last("nothing") is None
    assert await store.history("nothing") == []
    seq = (await store.append(Requested(**_common("H1"), execution_mode=ExecutionMode.ASYNC))).seq
    await store.append(Requested(**_common("OTHER"), execution_mode=ExecutionMode.ASYNC))
    for attempt in range(1, 300):  # more than one history batch
        seq = (await store.append(Started(**_common("H1"), attempt=attempt), expect_last_seq=seq)).seq
    history = await store.history("H1")
    assert [event.kind for event, _ in history[:2]] == ["requested", "started"]
    assert len(history) == 300
    assert [s for _, s in history] == sorted(s for _, s in history)
    assert {event.execution_id for event, _ in history} == {"H1"}
    last = await store.last("H1")
    assert last.seq == seq and last.event.attempt == 299
    assert len(await store.history("H1", after_seq=history[-3].seq)) == 2


async def test_a_pull_consumer_that_meets_no_responders_asks_again_at_once(client, names):
    """A pull request sent before a consumer can answer (a replicated consumer's new leader not
    listening yet; here: not created yet) gets 503 no responders: it asks again at once rather
    than when its watchdog misses the heartbeats (12.5 s)."""
    await topology.ensure_base(client, names)
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = PullConsumer(client, names.stream, "late", received.put_nowait, capacity=4, heartbeat_s=5.0)
    await consumer.start()  # nothing there to pull from yet
    try:
        await asyncio.sleep(0.3)  # its first requests meet no responders (nothing to observe but time)
        config = {"durable_name": "late", "ack_policy": "explicit", "filter_subject": f"{names.prefix}.exec.>"}
        await topology.ensure_consumer(client, names.stream, config)
        store = JetStreamStore(client, names)
        await store.append(Requested(**_common("P1"), execution_mode=ExecutionMode.ASYNC), expect_last_seq=0)
        msg = await asyncio.wait_for(received.get(), 5)  # well before the watchdog would ask again
        assert msg.subject == f"{names.prefix}.exec.demo.P1.requested"
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("error", "last_seq"),
    [
        ({"code": 400, "err_code": 10071, "description": "wrong last sequence: 41"}, 41),  # one replica
        ({"code": 400, "err_code": 10164, "description": "wrong last sequence"}, None),  # replicated
        ({"code": 400, "err_code": 10070, "description": "wrong last msg ID: x:started:1:5"}, None),
    ],
)
def test_a_lost_compare_and_set_is_a_conflict_on_any_stream(error, last_seq):
    """A replicated stream refuses a fenced append with 10164 and no sequence, where a one-replica
    stream says 10071 and the sequence. Both are a lost compare-and-set (read, decide again);
    taken for a store failure, a worker's refused end made the call fail (seen on a 3-node
    cluster under load)."""
    refusal = append_refusal(error)
    assert isinstance(refusal, AppendConflict)
    assert refusal.last_seq == last_seq


def test_any_other_refusal_of_an_append_is_a_store_error():
    refusal = append_refusal({"code": 503, "err_code": 10077, "description": "maximum messages exceeded"})
    assert isinstance(refusal, StoreError) and not isinstance(refusal, AppendConflict)
    assert str(refusal) == "maximum messages exceeded"


async def test_a_chain_s_events_share_one_trace_with_tracing_off_and_no_context(client, settings, names):
    """A gateway-run call without a caller's traceparent appends its chain under no span (tracing
    off): its events are still of one trace, as a worker's are (under the `requested` event's)."""
    assert not tracing.may_record()
    store = await _store(client, settings, names)
    events = [
        Requested(**_common("T1"), execution_mode=ExecutionMode.SYNC),
        Started(**_common("T1"), attempt=1),
        Completed(**_common("T1"), attempt=1, result=StoredResult(status=ExecutionStatus.COMPLETED, result=1)),
    ]
    ids = ["T1:requested", "T1:started", ""]
    await store.append_chain(events, expect_last_seq=0, msg_ids=ids, headers={"Spear-X": "y"})
    js = client.jetstream()
    stored = [await js.get_last_msg(names.stream, names.event("demo", "T1", e.kind)) for e in events]
    parents = [msg.headers["traceparent"].split("-") for msg in stored]
    assert len({trace_id for _, trace_id, _, _ in parents}) == 1  # one trace
    assert len({span_id for _, _, span_id, _ in parents}) == 3  # a span id each
    assert {(version, flags) for version, _, _, flags in parents} == {("00", "00")}
    assert all(msg.headers["Spear-X"] == "y" for msg in stored)
    # A caller's trace is kept as it was.
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    events = [Requested(**_common("T2"), execution_mode=ExecutionMode.SYNC), Started(**_common("T2"), attempt=1)]
    await store.append_chain(events, expect_last_seq=0, msg_ids=["T2:requested", ""], headers={"traceparent": caller})
    stored = [await js.get_last_msg(names.stream, names.event("demo", "T2", e.kind)) for e in events]
    assert {msg.headers["traceparent"][:36] for msg in stored} == {caller[:36]}
    assert {msg.headers["traceparent"][-3:] for msg in stored} == {"-01"}


async def test_an_append_nothing_takes_is_sent_again_for_its_timeout_then_said_not_stored(client, names):
    """No stream under the prefix (or its leader lost, or JetStream down): the server answers the
    append with a 503 status. Nothing took it, so it is sent again until its timeout (probe58:
    a cluster electing a new stream leader refused every call for 5-7 s), then StoreNotReached:
    unavailable, and surely not stored."""
    from spear.core.eventstore import StoreNotReached

    store = JetStreamStore(client, names, timeout=1)  # nothing applied: no stream
    began = time.monotonic()
    with pytest.raises(StoreNotReached, match=r"nothing took it for 0\.9 s"):
        await store.append(Requested(**_common("U1"), execution_mode=ExecutionMode.ASYNC), expect_last_seq=0)
    assert 0.85 <= time.monotonic() - began < 1.5


def test_jetstream_temporarily_unavailable_is_an_unavailable_store_not_an_internal_error():
    """10008 (a cluster electing a leader) may pass in a moment: callers are told UNAVAILABLE and
    try again (the SDK's readers do); it was a StoreError, answered INTERNAL ("a bug")."""
    from spear.api.errors import api_error
    from spear.core.enums import ErrorCode
    from spear.core.eventstore import StoreUnavailable
    from spear.jetstream.errors import api_refusal, append_refusal

    busy = {"code": 503, "err_code": 10008, "description": "JetStream system temporarily unavailable"}
    for refusal in (append_refusal(busy), api_refusal(busy)):
        assert isinstance(refusal, StoreUnavailable)
        assert api_error(refusal).code == ErrorCode.UNAVAILABLE
    other = api_refusal({"code": 400, "err_code": 10059, "description": "stream name is required"})
    assert not isinstance(other, StoreUnavailable) and api_error(other).code == ErrorCode.INTERNAL


async def test_the_server_counts_the_messages_a_filter_matches_and_keeps_nothing_for_it(client, settings, names):
    from spear.jetstream.counting import count_matching

    store = await _store(client, settings, names)
    for n in range(5):
        task = "demo" if n < 3 else "other"
        await store.append(Requested(**{**_common(f"C{n}"), "task_id": task}, execution_mode=ExecutionMode.ASYNC))
    await store.append(Started(**_common("C0"), attempt=1))

    async def count(task: str, kind: str) -> int:
        return await count_matching(client, names.stream, names.event(task, "*", kind), timeout=5)

    assert (await count("demo", "requested"), await count("other", "requested"), await count("*", "requested")) == (
        3,
        2,
        5,
    )
    assert (await count("demo", "started"), await count("absent", "requested")) == (1, 0)
    info = await topology.api_request(client, f"STREAM.INFO.{names.stream}", None, 5)
    assert info["state"]["consumer_count"] == 0  # read, not a consumer made


async def test_a_count_of_a_stream_that_is_not_there_is_unavailable(client, names):
    from spear.core.eventstore import StoreUnavailable
    from spear.jetstream.counting import count_matching

    with pytest.raises(StoreUnavailable):
        await count_matching(client, names.stream, names.event("demo", "*", "requested"), timeout=5)


async def test_an_existing_stream_keeps_its_replicas_whatever_a_component_asks(client, names, caplog):
    """probe58: a component started without `stream_replicas` lowered R3 streams and buckets to R1.
    Tested on one server, so the other way round: streams made with 1 replica, then the topology
    applied asking for 3. It must leave `num_replicas` at 1 and warn (before the fix it updated the
    streams to 3, which a lone server refuses: start-up failed). The code path that keeps the value
    is the same whichever way the setting differs."""
    await topology.ensure_base(client, names, replicas=1)
    with caplog.at_level("WARNING", logger="spear.jetstream.topology"):
        await asyncio.wait_for(topology.ensure_base(client, names, replicas=3, deadline_s=5), 20)
    for stream in (names.stream, f"KV_{names.state_bucket}", f"KV_{names.tasks_bucket}", names.registry_stream):
        info = await topology.api_request(client, f"STREAM.INFO.{stream}", None, 5)
        assert info["config"]["num_replicas"] == 1
        assert any(stream in r.getMessage() and "3" in r.getMessage() for r in caplog.records), stream


def test_a_jetstream_503_raised_by_nats_py_is_unavailable_not_internal():
    """probe58: nats-py raises JetStream's 503 "temporarily unavailable" (10008) as
    ServiceUnavailableError; health and admission (consumer_info) answered it INTERNAL (HTTP 500).
    A full JetStream (10023, also 503) is RESOURCE_EXHAUSTED, as the store's StoreFull is."""
    from nats.js.errors import APIError, ServiceUnavailableError

    from spear.api.errors import api_error
    from spear.core.enums import ErrorCode

    busy = ServiceUnavailableError(code=503, err_code=10008, description="JetStream system temporarily unavailable")
    assert api_error(busy).code == ErrorCode.UNAVAILABLE
    assert "temporarily unavailable" in api_error(busy).message
    full = ServiceUnavailableError(code=503, err_code=10023, description="insufficient resources")
    assert api_error(full).code == ErrorCode.RESOURCE_EXHAUSTED
    assert api_error(APIError(code=400, err_code=10059, description="bad")).code == ErrorCode.INTERNAL


async def test_health_meeting_a_jetstream_503_is_answered_not_an_internal_error(spear, monkeypatch):
    """probe58: a 503/10008 reading the projection consumer's info made health fail INTERNAL."""
    from nats.js.client import JetStreamContext
    from nats.js.errors import ServiceUnavailableError

    async def busy(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ServiceUnavailableError(code=503, err_code=10008, description="JetStream system temporarily unavailable")

    monkeypatch.setattr(JetStreamContext, "consumer_info", busy)
    health = await spear.service.health()
    assert health.components["nats"] is True and health.error_code == "", health


async def test_an_append_sent_again_that_cannot_be_sent_is_still_answered(tmp_path):
    """review62: `append_now`'s resend met a publish error outside the unreachable ones (nats-py's
    buffer full while it reconnects): it was raised out of the timer, and the append never
    answered (the caller timed out, its queue place kept for good). It is answered: not stored."""
    import nats

    from spear.aio import poll_until
    from spear.core.eventstore import StoreNotReached
    from spear.core.names import Names
    from spear.jetstream import rawrequests
    from spear.jetstream.embedded import EmbeddedNats
    from tests.processes import free_port

    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = await asyncio.to_thread(server.start)
    nc = await nats.connect(url, pending_size=64, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    try:
        store = JetStreamStore(nc, Names("nostream"), timeout=3)  # no stream: every append is a 503
        await rawrequests.prepare(nc)
        answers: list[object] = []
        event = Requested(**_common("R1"), execution_mode=ExecutionMode.ASYNC)
        assert store.append_now(event, "R1:requested", answers.append)
        await asyncio.sleep(0.3)  # a few 503s, each sent again
        await asyncio.to_thread(server.stop)  # the node lost: the client reconnects, its buffer small
        await poll_until(lambda: asyncio.sleep(0, answers), bool, timeout_s=5)
        assert len(answers) == 1 and isinstance(answers[0], StoreNotReached), answers
        assert "not sent again" in str(answers[0])
    finally:
        await nc.close()
