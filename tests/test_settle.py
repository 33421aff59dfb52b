"""Gateway-run invocations' ends read in batches (spear/worker/settle.py), against a real stream."""

import asyncio

import hypothesis
from hypothesis import strategies as st

from spear.core.enums import ExecutionMode, ExecutionStatus
from spear.core.events import Completed, Requested, Started, StoredResult
from spear.jetstream import topology
from spear.jetstream.headers import parse_header_lines
from spear.jetstream.store import JetStreamStore
from spear.worker import settle
from spear.worker.settle import Settler


def _common(execution_id, attempt=0):
    return dict(
        execution_id=execution_id, task_id="demo", function_name="echo", at="2026-01-01T00:00:00.000Z", attempt=attempt
    )


async def _requested(store, execution_id):
    return (await store.append(Requested(**_common(execution_id), execution_mode=ExecutionMode.SYNC))).seq


async def _ended(store, execution_id):
    seq = await _requested(store, execution_id)
    seq = (await store.append(Started(**_common(execution_id, 1)), expect_last_seq=seq)).seq
    result = StoredResult(status=ExecutionStatus.COMPLETED, result=execution_id, attempt=1)
    return (await store.append(Completed(**_common(execution_id, 1), result=result), expect_last_seq=seq)).seq


async def test_ends_of_many_executions_are_read_at_once_and_only_ends_count(client, names):
    await topology.ensure_base(client, names)
    store = JetStreamStore(client, names)
    ended = {f"E{i}": await _ended(store, f"E{i}") for i in range(5)}
    await _requested(store, "RUNNING")
    seq = await _requested(store, "JUNK")
    await _ended(store, "ENDED-THEN-JUNK")
    js = client.jetstream()
    await js.publish(names.append("demo", "JUNK", "completed"), b"{not json", stream=names.stream)
    await js.publish(names.append("demo", "ENDED-THEN-JUNK", "logged"), b"[]", stream=names.stream)
    assert (await store.last("JUNK")).seq > seq  # the junk is the newest message, its sequence says so
    settler = Settler(client, names, timeout_s=5)
    try:
        asked = [*ended, "RUNNING", "JUNK", "ENDED-THEN-JUNK", "NEVER-STORED"]
        found = await asyncio.gather(*(settler.ended(execution_id) for execution_id in asked))
        by_id = dict(zip(asked, found, strict=True))
        for execution_id, seq in ended.items():  # what the store's own read of the last event gives
            assert by_id[execution_id] == await store.last(execution_id)
            assert by_id[execution_id].seq == seq and by_id[execution_id].event.result.result == execution_id
        assert by_id["RUNNING"] is None and by_id["NEVER-STORED"] is None  # read the usual way
        assert by_id["JUNK"] is None and by_id["ENDED-THEN-JUNK"] is None  # unreadable newest: the usual way
    finally:
        await settler.stop()


async def test_a_full_batch_is_read_at_once_and_a_lone_one_after_the_window(client, names, monkeypatch):
    await topology.ensure_base(client, names)
    store = JetStreamStore(client, names)
    monkeypatch.setattr(settle, "MAX_EXECUTIONS", 3)
    monkeypatch.setattr(settle, "WINDOW_S", 30.0)  # a full batch must not wait for it
    ids = [f"F{i}" for i in range(3)]
    for execution_id in ids:
        await _ended(store, execution_id)
    settler = Settler(client, names, timeout_s=5)
    try:
        async with asyncio.timeout(5):
            found = await asyncio.gather(*(settler.ended(execution_id) for execution_id in ids))
        assert [stored.event.execution_id for stored in found] == ids
        monkeypatch.setattr(settle, "WINDOW_S", 0.01)
        async with asyncio.timeout(5):
            assert (await settler.ended(ids[0])).event.execution_id == ids[0]
    finally:
        await settler.stop()


async def test_a_read_that_gets_no_answer_settles_nothing(client, names):
    # no stream at all under this prefix: nothing answers the direct get (no responders)
    settler = Settler(client, names, timeout_s=1)
    try:
        async with asyncio.timeout(5):
            assert await settler.ended("E1") is None
    finally:
        await settler.stop()


async def test_stopping_answers_callers_whose_read_had_not_begun(client, names, monkeypatch):
    """A batch handed to a job that is cancelled before it runs: its callers are answered None
    (they then read the usual way) instead of waiting for ever."""
    monkeypatch.setattr(settle, "MAX_EXECUTIONS", 1)  # the batch is handed over at once
    settler = Settler(client, names, timeout_s=5)
    waiting = asyncio.ensure_future(settler.ended("S1"))
    for _ in range(1000):  # until the batch is handed to a job (that has not run yet)
        if settler._jobs:
            break
        await asyncio.sleep(0)
    await settler.stop()
    async with asyncio.timeout(5):
        assert await waiting is None


_name = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=12)
_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    stored=st.lists(st.tuples(st.one_of(_name, st.sampled_from(["Nats-Subject", "Nats-Sequence"])), _value)),
    subject=_name,
    seq=st.integers(min_value=1, max_value=2**63),
)
def test_headers_are_read_as_nats_py_reads_a_direct_get_reply(stored, subject, seq):
    # a direct get's reply: the headers the message was stored with, then the server's own
    lines = [f"{name}: {value}" for name, value in stored]
    lines += ["Nats-Stream: S", f"Nats-Subject: {subject}", f"Nats-Sequence: {seq}", "Nats-Time-Stamp: t"]
    block = ("NATS/1.0\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()
    parsed = parse_header_lines(block.partition(b"\r\n")[2])
    assert settle._header(block, b"Nats-Subject") == parsed["Nats-Subject"].encode()
    assert settle._header(block, b"Nats-Sequence") == parsed["Nats-Sequence"].encode() == str(seq).encode()
    assert settle._header(block, b"Absent") is None
