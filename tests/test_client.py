"""The client SDK (`spear.Client`, `spear.SyncClient`) against spear's real components: results,
typed errors per error code, handles that wait by subscription, events, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
import uuid
import warnings
from contextlib import AsyncExitStack
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio

from spear import Client, SyncClient, errors
from spear.client.wire import invoke_request
from spear.core.config import with_overrides
from tests.conftest import held_messages, off_its_subjects, start_spear


@pytest_asyncio.fixture
async def sdk(spear, nats_url):
    async with spear_client(nats_url, spear.settings.subject_prefix) as client:
        yield client


def spear_client(url: str, prefix: str) -> Client:
    return Client([url], prefix=prefix)


async def test_invoke_returns_the_result(sdk):
    assert await sdk.invoke("demo", "calculate_fibonacci", n=30) == 832040
    assert await sdk.invoke("demo", "echo", params={"value": {"nested": [1, "two"]}}) == {"nested": [1, "two"]}


async def test_a_parameter_given_both_in_params_and_as_a_keyword_is_refused(sdk):
    """probe29: `invoke(params={"value": 1}, value=2)` ran with 2, the keyword winning silently."""
    for call in (sdk.invoke, sdk.submit):
        with pytest.raises(TypeError, match="'value' is given both"):
            await call("demo", "echo", params={"value": 1}, value=2)
    assert await sdk.invoke("demo", "echo", params={"value": 1}) == 1


async def test_a_function_that_raises_is_function_failed_with_the_remote_error(sdk):
    with pytest.raises(errors.FunctionFailed) as failed:
        await sdk.invoke("demo", "fail", message="boom")
    assert failed.value.error_code == "FUNCTION_ERROR"
    assert "boom" in failed.value.error_message
    assert failed.value.status == "EXECUTION_STATUS_FAILED"
    status = await sdk.status(failed.value.execution_id)
    assert status.state == "failed" and status.error_code == "FUNCTION_ERROR"


async def test_outcomes_and_request_errors_are_typed(sdk):
    with pytest.raises(errors.Timeout) as timed_out:
        await sdk.invoke("demo", "sleep", ms=5000, timeout=0.2)
    assert timed_out.value.error_code == "TIMEOUT" and timed_out.value.execution_id
    assert isinstance(timed_out.value, TimeoutError)  # (probe56: `except TimeoutError` missed it)
    # Parameters that do not fit: refused at the door or failed by the function, one class to
    # catch (probe56: InvalidArgument for one, FunctionFailed for the other)
    with pytest.raises(errors.InvalidArgument) as refused:
        await sdk.invoke("demo", "echo", value=1, no_such_parameter=2)
    assert not isinstance(refused.value, errors.FunctionFailed)
    with pytest.raises(errors.InvalidArgument) as failed:
        await sdk.invoke("demo", "calculate_fibonacci", n="thirty")  # (the function raises InvalidArgument)
    assert isinstance(failed.value, errors.FunctionFailed) and failed.value.error_code == "INVALID_ARGUMENT"
    assert failed.value.execution_id and "n must be an integer" in str(failed.value), failed.value
    with pytest.raises(errors.NotFound):
        await sdk.invoke("demo", "no_such_function")
    with pytest.raises(errors.NotFound):
        await sdk.status("no-such-execution")
    with pytest.raises(errors.InvalidArgument):
        await sdk.invoke("demo", "echo", execution_id="not.an.id", value=1)
    with pytest.raises(errors.InvalidArgument):  # an empty key is refused, not replaced by a new id
        await sdk.invoke("demo", "echo", execution_id="", value=1)
    with pytest.raises(errors.InvalidArgument):  # a negative time limit too, not made 1 ms
        await sdk.invoke("demo", "echo", value=1, timeout=-1)
    await sdk.invoke("demo", "echo", execution_id="same-key", value=1)
    with pytest.raises(errors.AlreadyExists):
        await sdk.invoke("demo", "echo", execution_id="same-key", value=2)


async def test_calls_past_the_gateways_limit_are_asked_again_not_refused_at_once(settings, nats_url):
    """probe56: 300 SYNC calls gathered against the default limit of 100 at a time: 200 raised
    ResourceExhausted at once, even for functions of microseconds. The SDK asks again after a
    pause, within each call's wait; what could never be served within it is still refused."""
    limited = with_overrides(settings, sync_execution={"max_concurrent_requests": 2})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, limited)
        client = await stack.enter_async_context(spear_client(nats_url, running.settings.subject_prefix))
        results = await asyncio.gather(*(client.invoke("demo", "sleep", ms=50) for _ in range(12)))
        assert len(results) == 12
        busy = [asyncio.ensure_future(client.invoke("demo", "sleep", ms=3000)) for _ in range(2)]
        await asyncio.sleep(0.5)
        with pytest.raises(errors.ResourceExhausted):
            await client.invoke("demo", "sleep", ms=10, wait=0.5)
        await asyncio.gather(*busy)


async def test_calls_the_store_does_not_take_are_asked_again_while_the_call_may_wait(settings, nats_url, client):
    """probe58: while a stream's leader is lost, a gateway answers UNAVAILABLE once its append's
    timeout passes (nothing took it). The SDK asks an ASYNC call again with the same execution id
    (joined had it been stored) within the call's time, and it goes through once the stream takes
    appends again. A SYNC call is not asked again: an inline function ran in the gateway before
    anything was stored, and would run twice (review62). A call whose time ends first still
    raises Unavailable."""
    tuned = with_overrides(settings, nats={"request_timeout_ms": 500})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, tuned)
        sdk = await stack.enter_async_context(
            Client([nats_url], prefix=running.settings.subject_prefix, request_timeout=4)
        )
        assert await sdk.invoke("demo", "echo", value=0) == 0
        calls = await client.subscribe(running.names.api("invoke_function"))  # (each call the gateway gets)
        config = await off_its_subjects(client, running.names)
        try:
            submitted = asyncio.ensure_future(sdk.submit("demo", "echo", value=1))
            with pytest.raises(errors.Unavailable) as sync_refused:
                await sdk.invoke("demo", "echo", value=2)
            await asyncio.sleep(1.0)  # (the ASYNC call refused at 0.5 s at least once)
            assert not submitted.done()
        finally:
            await client.jetstream().update_stream(config)
        handle = await asyncio.wait_for(submitted, 10)
        assert await handle.result(timeout=10) == 1
        asked = [msgspec.json.decode(msg.data)["execution_id"] async for msg in held_messages(calls)]
        assert asked.count(handle.id) >= 2, asked  # asked again, under its id
        assert asked.count(sync_refused.value.execution_id) == 1 and len(set(asked)) == 2, asked
        config = await off_its_subjects(client, running.names)  # (and left so, for the call's time)
        try:
            with pytest.raises(errors.Unavailable, match="was not stored") as refused:
                await sdk.submit("demo", "echo", value=3)
        finally:
            await client.jetstream().update_stream(config)  # ("elsewhere.>" is for one stream at a time)
        assert refused.value.execution_id


async def test_a_busy_retry_after_nats_reconnected_still_does_not_say_the_id_is_new(tmp_path, monkeypatch):
    """A call refused RESOURCE_EXHAUSTED is asked again without `Spear-New-Execution-Id` (said
    new again, a stored request could run twice: review59). The client's NATS connection lost and
    made again between the refusal and the retry does not make the retry say it again: what the
    gateway's subject received is recorded, headers and all."""
    from spear.cli import components
    from spear.client import async_client
    from spear.core.config import load_settings
    from spear.demo import demo
    from spear.jetstream.embedded import EmbeddedNats
    from spear.service.callerwait import NEW_ID_HEADER
    from tests.conftest import start_undrained
    from tests.processes import free_port

    # the first retry 1.5 to 3 s after the refusal: the restart below fits in that pause
    monkeypatch.setattr(async_client, "BUSY_FIRST_PAUSE_S", 3.0)
    monkeypatch.setattr(async_client, "BUSY_LAST_PAUSE_S", 3.0)
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = await asyncio.to_thread(server.start)
    settings = with_overrides(load_settings(), nats={"urls": [url]}, subject_prefix="busy" + uuid.uuid4().hex[:6])
    try:
        async with AsyncExitStack() as stack:
            running = await start_undrained(stack, settings, max_queue_size=1)  # no worker takes calls
            client = await stack.enter_async_context(Client([url], prefix=settings.subject_prefix, request_timeout=30))
            await client.submit("demo", "echo", value=0)  # the queue is full
            restarted = asyncio.Event()
            heard: list[tuple[bool, str, dict[str, str]]] = []  # (after the restart?, execution id, headers)

            async def record(msg) -> None:
                heard.append((restarted.is_set(), json.loads(msg.data)["execution_id"], dict(msg.headers or {})))

            recorder = await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
            stack.push_async_callback(recorder.close)
            await recorder.subscribe(running.names.api("invoke_function"), cb=record)
            await recorder.flush()
            reconnects = client.nc.stats["reconnects"]
            call = asyncio.ensure_future(client.submit("demo", "echo", value=1))
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # refused meanwhile: the client pauses before asking again
            assert not call.done() and len(heard) == 1, heard
            server.kill()  # without warning
            restarted.set()
            assert await asyncio.to_thread(server.start) == url  # same port, same store
            await components.start_worker(stack, running.nc, running.settings, [demo])  # room, in time
            handle = await asyncio.wait_for(call, 25)
            assert await handle.result(timeout=10) == 1
            assert client.nc.stats["reconnects"] > reconnects
        (_, first_id, first), *retries = heard
        assert first.get(NEW_ID_HEADER) == "true"  # the first try: the id is new
        assert any(after for after, _, _ in retries), heard  # asked again after the reconnect
        assert all(execution_id == first_id == handle.id for _, execution_id, _ in retries), heard
        assert [headers for _, _, headers in retries if NEW_ID_HEADER in headers] == [], heard
    finally:
        await asyncio.to_thread(server.stop)


async def test_the_same_execution_id_runs_once(sdk):
    first = await sdk.submit("demo", "sleep", ms=50, execution_id="once-only")
    again = await sdk.submit("demo", "sleep", ms=50, execution_id="once-only")
    assert first.id == again.id == "once-only"
    assert await again.result(timeout=10) == 50
    events = [e.type async for e in first.events()]
    assert events.count("started") == 1 and events[-1] == "completed"


async def test_submit_then_result_waits_by_subscription(sdk):
    handle = await sdk.submit("demo", "process", dataset="d", steps=4, step_ms=50)
    assert (await handle.status()).state in ("pending", "running")
    assert await handle.result(timeout=10) == {"dataset": "d", "steps": 4}
    # once ended, result() answers from the stored status at once
    assert await handle.result(timeout=1) == {"dataset": "d", "steps": 4}


async def test_result_wait_that_ends_first_is_deadline_exceeded_naming_the_execution(sdk):
    handle = await sdk.submit("demo", "sleep", ms=3000)
    with pytest.raises(errors.DeadlineExceeded) as exceeded:
        await handle.result(timeout=0.2)
    assert exceeded.value.execution_id == handle.id
    assert isinstance(exceeded.value, TimeoutError)
    await handle.cancel(force=True)


async def test_events_replay_then_follow_each_once_until_terminal(sdk):
    handle = await sdk.submit("demo", "process", dataset="d", steps=3, step_ms=50)
    live = [e async for e in handle.events()]
    kinds = [e.type for e in live]
    assert kinds[0] == "requested" and kinds[-1] == "completed" and "started" in kinds
    assert [e.progress for e in live if e.progress is not None][-1] == pytest.approx(1.0)
    seqs = [e.seq for e in live]
    assert seqs == sorted(set(seqs))
    replay = [e async for e in handle.events()]  # a late reader sees the same, from the store
    assert [(e.seq, e.type) for e in replay] == [(e.seq, e.type) for e in live]


async def test_cancel_a_running_execution(sdk):
    handle = await sdk.submit("demo", "sleep", ms=10_000)
    async for event in handle.events():
        if event.type == "started":
            break
    assert await handle.cancel(reason="test") in ("EXECUTION_STATUS_CANCELLED", "EXECUTION_STATUS_RUNNING")
    with pytest.raises(errors.Cancelled) as cancelled:
        await handle.result(timeout=10)
    assert cancelled.value.execution_id == handle.id
    with pytest.raises(errors.FailedPrecondition) as again:
        await handle.cancel()
    assert again.value.final_status == "EXECUTION_STATUS_CANCELLED"
    assert again.value.execution_id == handle.id  # (probe30: the reply names none)
    with pytest.raises(errors.NotFound) as unknown:
        await sdk.cancel("no-such-execution")
    assert unknown.value.execution_id == "no-such-execution"


async def test_lists_tasks_and_workers(sdk, spear):
    handle = await sdk.submit("demo", "echo", value=1)
    await handle.result(timeout=10)
    await spear.caught_up()
    page = await sdk.executions(task_id="demo", status="completed", limit=5)
    assert handle.id in [e["execution_id"] for e in page["executions"]]
    assert "demo" in [t["task_id"] for t in await sdk.tasks()]
    workers = await sdk.workers()
    assert [w["worker_id"] for w in workers] == [spear.worker.worker_id]


async def test_no_gateway_is_unavailable(nats_url):
    """probe39: the error named an execution id the call would have had, which no status query
    could find (nothing received the call); it names the prefix, the likely mistake, instead."""
    async with spear_client(nats_url, "nobody-here") as client:
        with pytest.raises(errors.NoGateway, match="no spear gateway") as refused:
            await client.invoke("demo", "echo", value=1)
    assert isinstance(refused.value, errors.Unavailable) and refused.value.code == "UNAVAILABLE"
    assert refused.value.execution_id == "" or refused.value.execution_id is None, refused.value.execution_id
    assert "under subject prefix 'nobody-here' (SPEAR_SUBJECT_PREFIX)" in str(refused.value)
    assert "may be stored" not in str(refused.value)


async def test_no_gateway_after_asking_again_keeps_the_execution_id(nats_url):
    """review40: a call asked again after a reconnect that then met no gateway said "nothing was
    received" (NoGateway, no id), though its first asking had been: a caller who believed it
    would call again without the id, and the function would run twice."""
    from tests.stallproxy import StallProxy

    host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
    prefix = "reask" + uuid.uuid4().hex[:6]
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(StallProxy(host, int(port)).serving())
        gateway = await nats.connect(nats_url)
        stack.push_async_callback(gateway.close)
        received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def take(msg) -> None:  # a gateway that stores it, then goes (restarts) before replying
            if not received.done():
                received.set_result(json.loads(msg.data)["execution_id"])
                await subscription.unsubscribe()

        subscription = await gateway.subscribe(f"{prefix}.api.invoke_function", queue="q", cb=take)
        await gateway.flush()
        client = await stack.enter_async_context(spear_client(proxy.url, prefix))
        call = asyncio.ensure_future(client.invoke("demo", "sleep", ms=5000, timeout=30))
        execution_id = await asyncio.wait_for(received, 5)
        await asyncio.sleep(0.2)
        proxy.cut()  # the client reconnects and asks again: nobody answers now
        with pytest.raises(errors.Unavailable) as ended:
            await call
        assert not isinstance(ended.value, errors.NoGateway), ended.value
        assert ended.value.execution_id == execution_id, ended.value


async def test_an_asking_given_up_is_read_not_reported_as_never_retrieved(nats_url):
    """probe56: a request asked again after a reconnect cancelled the first asking, whose
    nats-py request can let the cancel pass (its reply came meanwhile) and end in an error later:
    a dozen "Task exception was never retrieved" tracebacks per NATS restart."""
    from spear.client.async_client import _Asking

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    nc = await nats.connect(nats_url)
    try:
        asking = _Asking(nc, "nobody.listens." + uuid.uuid4().hex, b"{}", None, 5, True)
        asking.reply.cancel()

        async def stubborn() -> Any:  # as such a request: the cancel passes, an error comes after
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
            raise nats.errors.NoRespondersError

        asking.reply = asyncio.ensure_future(stubborn())
        await asyncio.sleep(0)
        asking.give_up()
        await asyncio.sleep(0.05)
        del asking
        gc.collect()
        await asyncio.sleep(0)
        assert not [context for context in reported if "never retrieved" in context["message"]], reported
    finally:
        loop.set_exception_handler(None)
        await nc.close()


async def test_unreachable_nats_is_unavailable_within_the_connect_timeout():
    began = time.monotonic()
    with pytest.raises(errors.Unavailable, match=r"cannot reach NATS at nats://127\.0\.0\.1:1"):
        await Client("nats://127.0.0.1:1,nats://127.0.0.1:2", connect_timeout=1.0).connect()
    assert time.monotonic() - began < 3


async def test_a_url_list_with_one_live_server_connects(sdk, nats_url, spear):
    async with Client(f"nats://127.0.0.1:1,{nats_url}", prefix=spear.settings.subject_prefix) as client:
        assert await client.invoke("demo", "quick_calculation", input=21) == 42


async def test_sync_client_from_a_thread_without_a_loop(spear, nats_url):
    def script() -> tuple[object, ...]:
        with SyncClient(nats_url, prefix=spear.settings.subject_prefix) as client:
            value = client.invoke("demo", "calculate_fibonacci", n=10)
            handle = client.submit("demo", "echo", value="x")
            events = list(handle.events())
            kinds = [e.type for e in events]
            assert list(handle.events(after_seq=events[0].seq)) == events[1:]  # (probe28: no arguments)
            with pytest.raises(errors.FunctionFailed):
                client.invoke("demo", "fail", message="no")
            failing = client.submit("demo", "fail", message="no", max_retries=0)
            ended = failing.wait(timeout=10)  # (probe28: SyncHandle had no wait)
            assert ended["status"] == "EXECUTION_STATUS_FAILED" and "no" in ended["error_message"], ended
            chunks = list(client.stream("demo", "generate_text", prompt="s", tokens=2))
            streamed = client.submit("demo", "generate_text", mode="STREAM", prompt="t u", tokens=3)
            assert [(c.seq, c.data) for c in streamed.chunks()] == [(0, "t "), (1, "u "), (2, "t")]
            assert [w["tasks"] for w in client.workers()] == [["demo"]]
            assert client.workers("nothing-serves-this") == []
            assert [t["task_id"] for t in client.tasks(prefix="dem")] == ["demo"] and client.tasks(prefix="x") == []
            assert client.health()["components"]["nats"] is True
            return value, handle.result(timeout=10), kinds, chunks

    value, echoed, kinds, chunks = await asyncio.to_thread(script)
    assert (value, echoed, kinds[-1], chunks) == (55, "x", "completed", ["s ", "s"])


async def test_a_sync_client_raises_deadline_exceeded_where_the_wait_ends_first(spear, nats_url):
    """probe41: DeadlineExceeded is a TimeoutError, as the sync client's polls of its call are:
    taken for one, it was raised again at every poll and the call never returned (CPU spinning)."""

    def script() -> tuple[float, errors.DeadlineExceeded, str]:
        with SyncClient(nats_url, prefix=spear.settings.subject_prefix) as client:
            handle = client.submit("demo", "sleep", ms=1500)
            began = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded) as exceeded:
                handle.result(timeout=0.2)
            took = time.monotonic() - began
            return took, exceeded.value, handle.id

    took, error, execution_id = await asyncio.to_thread(script)
    assert took < 2.0 and error.execution_id == execution_id, (took, error)


async def test_stream_yields_chunks_and_a_late_reader_replays_them(sdk):
    chunks = [chunk async for chunk in sdk.stream("demo", "generate_text", prompt="a b c", tokens=5)]
    assert chunks == ["a ", "b ", "c ", "a ", "b"]
    handle = await sdk.submit("demo", "generate_text", mode="STREAM", prompt="x y", tokens=4, delay_ms=10)
    assert handle.stream_subject.endswith(f".{handle.id}.*")
    assert await handle.result(timeout=10) == "x y x y"  # the generator's return value
    replay = [chunk async for chunk in handle.chunks()]  # after the end: all from the stream
    assert [(c.seq, c.data) for c in replay] == [(0, "x "), (1, "y "), (2, "x "), (3, "y")]


async def test_a_function_that_is_not_a_generator_streams_what_it_returned(sdk):
    """Told apart by the function's kind (the task's catalog), not by what it returned."""
    assert [chunk async for chunk in sdk.stream("demo", "echo", value={"a": [1]})] == [{"a": [1]}]
    assert [chunk async for chunk in sdk.stream("demo", "quick_calculation", input=4)] == [8]
    assert [chunk async for chunk in sdk.stream("demo", "echo", value=None)] == []  # None: nothing
    # a generator that yields nothing streams nothing, whatever it returns ("" here)
    assert [chunk async for chunk in sdk.stream("demo", "generate_text", prompt="p", tokens=0)] == []
    assert await sdk.yields_items("demo", "generate_text") and not await sdk.yields_items("demo", "echo")
    assert await sdk.yields_items("no-such-task", "f")  # unknown: the call itself says what is wrong


async def test_a_stream_that_fails_raises_after_its_chunks(sdk):
    with pytest.raises(errors.FunctionFailed) as failed:
        async for _ in sdk.stream("demo", "generate_text", prompt="p", tokens=-1):
            pass
    assert failed.value.error_code == "INVALID_ARGUMENT"


def test_every_request_error_code_has_its_exception():
    from spear.core.enums import HTTP_STATUS

    assert {str(code) for code in HTTP_STATUS} == set(errors.REQUEST_ERRORS)
    for code, cls in errors.REQUEST_ERRORS.items():
        error = errors.request_error(code, "why", execution_id="e1")
        assert type(error) is cls and error.code == code and error.execution_id == "e1"


async def test_credentials_are_used_and_a_refusal_says_so(tmp_path):
    from spear.jetstream.embedded import EmbeddedNats

    server = EmbeddedNats(tmp_path, port=-1, extra_config='authorization { token: "t0ken" }')
    url = await asyncio.to_thread(server.start)
    try:
        async with Client(url, token="t0ken") as client:
            assert client.nc.is_connected
        began = time.monotonic()
        with pytest.raises(errors.Unauthenticated, match="refused the credentials"):
            await Client(url, token="wrong", connect_timeout=5).connect()
        assert time.monotonic() - began < 2  # refused at once, not after the connect timeout
    finally:
        server.stop()


async def test_parameters_json_cannot_hold_are_refused_before_anything_is_sent(sdk, spear):
    """probe19: keys 1 and "1" were merged silently ({"1": "b"}), NaN got the server's "malformed
    JSON", a NaN timeout a bare ValueError. Values are encoded as the server stores them."""
    before = (await sdk.nc.jetstream().stream_info(spear.names.stream)).state.messages
    for params, said in (
        ({"value": {1: "a", "1": "b"}}, "parameter 'value' cannot be sent as JSON"),
        ({"value": float("nan")}, "parameter 'value' cannot be sent as JSON"),
        ({"value": [float("inf")]}, "NaN or Infinity"),
    ):
        with pytest.raises(errors.InvalidArgument, match=said):
            await sdk.invoke("demo", "echo", params=params)
    with pytest.raises(errors.InvalidArgument, match="timeout must be a number of seconds"):
        await sdk.invoke("demo", "echo", value=1, timeout=float("nan"))
    assert (await sdk.nc.jetstream().stream_info(spear.names.stream)).state.messages == before
    assert await sdk.invoke("demo", "echo", value={1: "a", 2: (3, 4)}) == {"1": "a", "2": [3, 4]}  # as JSON has them


async def test_a_nats_that_went_down_is_unavailable_not_a_deadline(tmp_path):
    """nats-py holds requests while it reconnects, so a NATS gone down under a long-lived
    client timed out as DeadlineExceeded, "the wait ended before the execution did" (review14)."""
    from spear.jetstream.embedded import EmbeddedNats

    server = EmbeddedNats(tmp_path, port=-1)
    url = await asyncio.to_thread(server.start)
    try:
        async with Client(url, request_timeout=0.5) as client:
            await asyncio.to_thread(server.stop)
            for _ in range(100):  # until the client has seen the server go
                if client.nc.is_reconnecting:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(errors.Unavailable, match=r"NATS cannot be reached \(the client is reconnecting"):
                await client.status("some-execution")
            with pytest.raises(errors.Unavailable) as lost:
                await client.submit("demo", "echo", value=1)
            assert lost.value.execution_id and "may be stored" in str(lost.value)  # still named
    finally:
        server.stop()


async def test_a_reply_that_never_comes_still_names_the_execution(nats_url):
    """The SDK makes an ASYNC execution's id when the caller gives none (as the CLI does): a
    restart that swallows the reply leaves an error naming the execution, to query or ask again with."""
    import nats

    heard: list[tuple[dict, dict]] = []
    silent = await nats.connect(nats_url)  # a gateway that takes the request and never answers

    async def swallow(msg) -> None:
        heard.append((json.loads(msg.data), dict(msg.headers or {})))

    await silent.subscribe("silent.api.invoke_function", cb=swallow)
    await silent.flush()
    try:
        async with Client([nats_url], prefix="silent", request_timeout=0.5) as client:
            with pytest.raises(errors.DeadlineExceeded) as lost_async:
                await client.submit("demo", "echo", value=1)
            with pytest.raises(errors.DeadlineExceeded) as lost_sync:  # SYNC too (a gateway dying mid-call)
                await client.invoke("demo", "echo", value=1, timeout=0.3, wait=0.5)
        for (request, headers), lost in zip(heard, (lost_async, lost_sync), strict=True):
            assert lost.value.execution_id == request["execution_id"] and len(request["execution_id"]) == 26
            assert request["execution_id"] in str(lost.value)
            assert headers["Spear-New-Execution-Id"] == "true"
    finally:
        await silent.close()


async def test_a_wait_with_a_timeout_ends_then_though_the_gateway_does_not_answer(nats_url):
    """probe45: `result(timeout=0.5)` against a frozen server raised DeadlineExceeded after 10.5 s:
    its first status read, outside the wait's bound, took the whole request timeout."""
    import nats

    silent = await nats.connect(nats_url)  # a gateway that takes the request and never answers

    async def takes(msg) -> None:
        pass

    await silent.subscribe("frozen.api.get_execution_status", cb=takes)
    await silent.flush()
    try:
        async with Client([nats_url], prefix="frozen", request_timeout=5) as client:
            began = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded) as ended:
                await client.execution("01M8TQ2KDDAR4E3QXW28ZEJA1X").result(timeout=0.5)
            assert time.monotonic() - began < 2.0, time.monotonic() - began
            assert ended.value.execution_id == "01M8TQ2KDDAR4E3QXW28ZEJA1X"
    finally:
        await silent.close()


async def test_a_wait_of_no_time_looks_once(sdk):
    """`result(timeout=0)`: the result of an execution that has ended, DeadlineExceeded at once
    for one that has not (its one look may take a request, no more)."""
    ended = await sdk.submit("demo", "echo", value="done")
    await ended.wait(timeout=10)
    assert await ended.result(timeout=0) == "done"
    running = await sdk.submit("demo", "sleep", ms=3000)
    began = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await running.result(timeout=0)
    assert time.monotonic() - began < 1.0


async def test_a_wait_whose_end_was_never_announced_still_sees_it(sdk, monkeypatch):
    """A terminal message published while the connection was down (a server restart) never comes:
    the wait reads the status again every RECHECK_S anyway."""
    from spear.client import handle as handle_module

    monkeypatch.setattr(handle_module, "RECHECK_S", 0.2)
    handle = await sdk.submit("demo", "sleep", ms=300)
    handle.stream_subject = "nothing.is.published.here"  # the announcement is lost
    assert (await handle.wait(timeout=10))["status"] == "EXECUTION_STATUS_COMPLETED"


async def test_a_wait_rides_out_a_gateway_that_does_not_answer_for_a_while(sdk, monkeypatch):
    from spear.client import handle as handle_module

    monkeypatch.setattr(handle_module, "RECHECK_S", 0.2)
    handle = await sdk.submit("demo", "sleep", ms=300)
    status, failures = handle.status, []

    async def restarting():  # the first reads after the start meet no gateway (a restart)
        if len(failures) < 3:
            failures.append(1)
            if len(failures) > 1:
                raise errors.Unavailable("no spear gateway answers")
        return await status()

    monkeypatch.setattr(handle, "status", restarting)
    assert (await handle.wait(timeout=10))["status"] == "EXECUTION_STATUS_COMPLETED"
    assert len(failures) == 3


@pytest.mark.parametrize("servers", ["", [], " , "])
async def test_no_server_named_is_the_default_not_a_hang(spear, nats_url, monkeypatch, servers):
    """probe28: an empty server list reached nats-py, whose choice of server spun the loop for
    ever (`Client(os.environ.get("NATS_URL", ""))`). None named is the default, as on the CLI."""
    monkeypatch.setenv("SPEAR_NATS_URL", nats_url)
    client = Client(servers, prefix=spear.settings.subject_prefix)
    assert client.servers == [nats_url]  # (before connecting: a hang would not fail, it would hang)
    async with client:
        assert await client.invoke("demo", "quick_calculation", input=21) == 42


@pytest.mark.parametrize("servers", ["garbage://::", ["nats://127.0.0.1:4222", "nats://h:x"]])
def test_a_nats_url_that_cannot_be_used_is_refused_at_once(servers):
    """probe28: nats-py's failure to parse a URL read as "NATS cannot be reached"."""
    with pytest.raises(ValueError, match="NATS URL"):
        Client(servers)


async def test_blanks_in_spear_nats_url_are_left_out(spear, nats_url, monkeypatch):
    """review22: `SPEAR_NATS_URL="nats://h:4222,"` kept its blank entry, and connect() failed."""
    monkeypatch.setenv("SPEAR_NATS_URL", f" ,{nats_url},")
    for client in (Client(prefix=spear.settings.subject_prefix), Client("", prefix=spear.settings.subject_prefix)):
        assert client.servers == [nats_url]
        async with client:
            assert await client.invoke("demo", "quick_calculation", input=21) == 42


async def test_a_client_not_connected_says_so_and_names_no_execution(spear, nats_url):
    """probe28: submit() on a client never connected, or closed, raised Unavailable naming an
    execution id the client had made up, "may be stored and go on": nothing had been sent."""
    client = spear_client(nats_url, spear.settings.subject_prefix)
    for _ in range(2):  # never connected, then closed
        for call in (client.submit("demo", "echo", value=1), client.invoke("demo", "echo", value=1)):
            with pytest.raises(errors.Unavailable, match="not connected") as refused:
                await call
            assert not refused.value.execution_id and "may be stored" not in str(refused.value)
        await client.connect()
        await client.close()


async def test_a_request_over_what_nats_takes_is_payload_too_large(sdk):
    """probe28: a request over the server's max_payload raised nats-py's own MaxPayloadError,
    which `except spear.errors.SpearError` does not catch."""
    with pytest.raises(errors.PayloadTooLarge, match=r"over the \d+ bytes NATS takes"):
        await sdk.invoke("demo", "echo", value="x" * (sdk.nc.max_payload + 1))

    # Under the limit by itself, over it with the headers an invocation carries (review22: the
    # server then closed the connection, failing every request on it)
    def body_bytes(chars: int) -> int:  # (the request as the client encodes it, with an id of its own)
        request = invoke_request("demo", "echo", "SYNC", {"value": "x" * chars}, "0" * 26, None, None)
        return len(msgspec.json.encode(request))

    fits = sdk.nc.max_payload - 10 - body_bytes(0)
    assert body_bytes(fits) < sdk.nc.max_payload
    with pytest.raises(errors.PayloadTooLarge, match=r"over the \d+ bytes NATS takes"):
        await sdk.invoke("demo", "echo", value="x" * fits)
    assert await sdk.invoke("demo", "quick_calculation", input=21) == 42  # the connection serves on


async def test_a_sync_client_used_after_close_says_so(spear, nats_url):
    """probe28: after close() a call raised a bare RuntimeError ("Event loop is closed") and left
    a coroutine never awaited; a stream left open printed a traceback at exit. Now Unavailable,
    as Client says, and an open stream is closed with the client."""

    def script() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = SyncClient(nats_url, prefix=spear.settings.subject_prefix)
            items = client.stream("demo", "generate_text", prompt="a b c", tokens=3)
            assert next(items) == "a "
            client.close()
            with pytest.raises(errors.Unavailable, match="closed"):
                client.status("anything")
            with pytest.raises(errors.Unavailable, match="closed"):
                next(items)  # (its async iterator was closed with the client)
            del items
            gc.collect()
        return [str(warning.message) for warning in caught]

    said = await asyncio.to_thread(script)
    assert not [message for message in said if "never awaited" in message], said


async def _run_script(code: str, *args: str, interrupt_after: bytes | None = None) -> tuple[int | None, str]:
    """Run a Python script in its own interpreter; send it SIGINT once its stdout says
    `interrupt_after`. Its exit code (None: still running after 20 s, then killed) and output."""
    import signal
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert process.stdout is not None
    said = b""
    try:
        if interrupt_after is not None:
            while interrupt_after not in said:
                line = await asyncio.wait_for(process.stdout.readline(), 20)
                assert line, said
                said += line
            process.send_signal(signal.SIGINT)
        said += await asyncio.wait_for(process.stdout.read(), 20)
        return await asyncio.wait_for(process.wait(), 5), said.decode()
    except TimeoutError:
        process.kill()
        await process.wait()
        return None, said.decode()


async def test_ctrl_c_while_a_sync_client_reads_a_stream_is_a_keyboard_interrupt(spear, nats_url):
    """probe33: Ctrl-C while `SyncClient.stream()` waited for its next item became "RuntimeError:
    aclose(): asynchronous generator is already running", and the generator went on on the
    client's loop: an application's `except KeyboardInterrupt` never ran."""
    code = """if True:
        import sys
        from spear import SyncClient
        client = SyncClient(sys.argv[1], prefix=sys.argv[2])
        try:
            for item in client.stream("demo", "generate_text", prompt="a b", tokens=100, delay_ms=200):
                print("item", flush=True)
        except KeyboardInterrupt:
            print("interrupted; in flight:", len(client._in_flight), flush=True)
        client.close()
        print("closed", flush=True)
    """
    code_, said = await _run_script(code, nats_url, spear.settings.subject_prefix, interrupt_after=b"item")
    await cancel_what_runs(nats_url, spear.settings.subject_prefix)  # (the fixture's stop need not wait for it)
    assert code_ == 0 and "interrupted; in flight: 0" in said and "closed" in said, said
    assert "RuntimeError" not in said, said


def test_a_keyboard_interrupt_under_a_broken_lock_release_is_found_as_the_interrupt():
    """CPython: a KeyboardInterrupt landing in `threading.Condition.wait` as it takes its lock back
    leaves the `with` around it releasing a lock it does not hold: "RuntimeError: release unlocked
    lock" is raised over the interrupt. The SyncClient's waits find the interrupt under it (as
    its context, or deeper in the chain), and nothing in a RuntimeError that has none."""
    from spear.sync_client import _interruption

    def raised_over_an_interrupt() -> RuntimeError:
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                threading.Lock().release()  # as the `with` does then
        except RuntimeError as error:
            return error
        raise AssertionError("no RuntimeError")

    broken = raised_over_an_interrupt()
    assert "release unlocked lock" in str(broken) and isinstance(broken.__context__, KeyboardInterrupt)
    assert _interruption(broken) is broken.__context__
    try:  # one more link: a RuntimeError raised from one raised over the interrupt
        raise RuntimeError("wrapped") from broken
    except RuntimeError as error:
        assert _interruption(error) is broken.__context__
    assert _interruption(RuntimeError("its own")) is None  # no interrupt under it: raised as it is
    assert _interruption(broken.__context__) is None  # (a clean one is raised as it is)
    looped = RuntimeError("a cycle")
    looped.__context__ = ValueError()
    looped.__context__.__context__ = looped
    assert _interruption(looped) is None


async def test_ctrl_c_that_breaks_a_sync_client_waits_lock_is_a_keyboard_interrupt(spear, nats_url):
    """CI: Ctrl-C while a SyncClient stream waited for its next item surfaced once as
    "RuntimeError: release unlocked lock" (the interrupt, landed in the wait's lock handling, its
    `__context__`), not as a KeyboardInterrupt. The wait meets that error for real here, once, as
    the stream's call runs on the client's loop: the script sees a KeyboardInterrupt, and the call
    is ended on the loop as for a clean one."""
    code = """if True:
        import concurrent.futures, sys, threading, time
        from spear import SyncClient
        client = SyncClient(sys.argv[1], prefix=sys.argv[2])
        real_wait, armed = concurrent.futures.wait, []

        def interrupted_wait(fs, timeout=None, return_when=concurrent.futures.ALL_COMPLETED):
            if not armed:
                return real_wait(fs, timeout, return_when)
            armed.clear()  # once
            deadline = time.monotonic() + 5
            while not client._in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            print("in flight before:", len(client._in_flight), flush=True)
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                threading.Lock().release()  # as Condition.wait's `with` then: release unlocked lock

        concurrent.futures.wait = interrupted_wait
        try:
            for item in client.stream("demo", "generate_text", prompt="a b", tokens=100, delay_ms=300):
                print("item", flush=True)
                armed.append(True)
        except KeyboardInterrupt:
            print("interrupted; in flight:", len(client._in_flight), flush=True)
        except BaseException as error:
            print("not interrupted:", repr(error), flush=True)
        client.close()
        print("closed", flush=True)
    """
    code_, said = await _run_script(code, nats_url, spear.settings.subject_prefix)
    await cancel_what_runs(nats_url, spear.settings.subject_prefix)  # (the fixture's stop need not wait for it)
    assert code_ == 0 and "in flight before: 1" in said and "interrupted; in flight: 0" in said, said
    assert "closed" in said and "not interrupted" not in said and "RuntimeError" not in said, said


async def test_a_script_that_leaves_a_sync_client_and_its_stream_open_ends(spear, nats_url):
    """probe33: a script that read one item of a stream and ended without `close()` never exited:
    the stream's generator, finalized at exit, waited for the client's loop, whose daemon thread
    the exiting interpreter runs no more."""
    code = """if True:
        import sys
        from spear import SyncClient
        client = SyncClient(sys.argv[1], prefix=sys.argv[2])
        items = client.stream("demo", "generate_text", prompt="a b", tokens=100, delay_ms=200)
        print("first", next(items), flush=True)
    """
    exit_code, said = await _run_script(code, nats_url, spear.settings.subject_prefix)
    await cancel_what_runs(nats_url, spear.settings.subject_prefix)
    assert exit_code == 0 and "first a" in said, (exit_code, said)


async def test_a_call_sent_as_close_begins_ends_unavailable_on_the_loop(spear, nats_url):
    """review23: a thread past `_call`'s check whose call reached the loop after `close` had
    ended the calls in flight was not ended by it: its coroutine died later on a closed loop."""

    def script() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = SyncClient(nats_url, prefix=spear.settings.subject_prefix)
            client._closed = True  # (`close` has begun: what such a call meets on the loop)
            with pytest.raises(errors.Unavailable, match="closed"):
                client._wait(client.client.health())
            client._closed = False
            client.close()
            gc.collect()
        return [str(warning.message) for warning in caught]

    said = await asyncio.to_thread(script)
    assert not [message for message in said if "never awaited" in message], said


async def cancel_what_runs(nats_url: str, prefix: str) -> None:
    """Cancel what a test left running, so that stopping its worker does not wait for it (whatever
    the listing says of it: it may not show it running yet)."""
    async with spear_client(nats_url, prefix) as client:
        for execution in (await client.executions(task_id="demo"))["executions"]:
            if execution["status"] in ("EXECUTION_STATUS_PENDING", "EXECUTION_STATUS_RUNNING"):
                await client.cancel(execution["execution_id"], force=True)


@pytest.mark.parametrize("call", ["result", "stream"])
async def test_closing_a_sync_client_ends_the_calls_other_threads_wait_for(spear, nats_url, call):
    """review22: one thread waited for a result (or iterated a stream) while another closed the
    client: the loop stopped under the pending call, and the waiting thread blocked for ever."""
    outcome: list[object] = []

    def script() -> None:
        client = SyncClient(nats_url, prefix=spear.settings.subject_prefix)
        started = threading.Event()

        def waiter() -> None:
            try:
                if call == "result":
                    handle = client.submit("demo", "process", dataset="d", steps=200, step_ms=100)
                    started.set()
                    outcome.append(handle.result())
                else:
                    for _ in client.stream("demo", "generate_text", prompt="a b c", tokens=400, delay_ms=50):
                        started.set()
                    outcome.append("the stream ended")
            except errors.SpearError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        assert started.wait(10)
        time.sleep(0.3)  # (the call waits now)
        client.close()
        thread.join(10)
        assert not thread.is_alive(), "the call in flight never returned after close()"

    await asyncio.to_thread(script)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.Unavailable), outcome
    await cancel_what_runs(nats_url, spear.settings.subject_prefix)


async def test_a_stream_closed_between_two_items_ends_unavailable_not_as_its_end(spear, nats_url):
    """CI: `close` closed a stream's iterator while the reading thread was between two items; its
    next item was then asked of a closed iterator while the loop still ran, and the stream seemed
    to have ended normally."""

    def script() -> object:
        client = SyncClient(nats_url, prefix=spear.settings.subject_prefix)
        closing, go_on = threading.Event(), threading.Event()
        close_connection = client.client.close

        async def close_when_let() -> None:  # holds `close` after it closed the stream, loop running
            closing.set()
            await asyncio.to_thread(go_on.wait, 10)
            await close_connection()

        client.client.close = close_when_let  # type: ignore[method-assign]
        items = client.stream("demo", "generate_text", prompt="a b c", tokens=400, delay_ms=50)
        next(items)
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        assert closing.wait(10)
        try:
            next(items)
            return "the stream went on or ended"
        except StopIteration:
            return "the stream ended"
        except errors.SpearError as exc:
            return exc
        finally:
            go_on.set()
            closer.join(10)

    outcome = await asyncio.to_thread(script)
    assert isinstance(outcome, errors.Unavailable), outcome
    await cancel_what_runs(nats_url, spear.settings.subject_prefix)


async def test_closing_a_client_ends_the_calls_in_flight_unavailable(spear, nats_url):
    """probe29: `await client.close()` while calls waited in other tasks: a SYNC invoke waited its
    whole wait (120 s), result()/wait() raised nats-py's ConnectionClosedError some 5 s later, and
    events()/stream() the same after some 45 s. Each now ends at once, Unavailable (as SyncClient's
    calls do), and a call made after close is refused at once."""
    client = spear_client(nats_url, spear.settings.subject_prefix)
    await client.connect()
    handles = [await client.submit("demo", "sleep", ms=20_000) for _ in range(3)]

    async def events() -> None:
        async for _ in handles[2].events():
            pass

    async def stream() -> None:
        async for _ in client.stream("demo", "generate_text", prompt="a b c", tokens=400, delay_ms=50):
            pass

    calls = {
        "invoke": client.invoke("demo", "sleep", ms=20_000),
        "result": handles[0].result(),
        "wait": handles[1].wait(),
        "events": events(),
        "stream": stream(),
    }
    tasks = {name: asyncio.create_task(call) for name, call in calls.items()}
    try:
        await asyncio.sleep(1.0)  # (each call waits now)
        assert not [name for name, task in tasks.items() if task.done()]
        began = time.monotonic()
        await client.close()
        await asyncio.wait(tasks.values(), timeout=10)
        took = time.monotonic() - began
        outcomes = {name: task.exception() if task.done() else "still waiting" for name, task in tasks.items()}
        assert all(isinstance(outcome, errors.Unavailable) for outcome in outcomes.values()), outcomes
        assert all("closed" in str(outcome) for outcome in outcomes.values()), outcomes
        assert took < 2, f"the calls in flight took {took:.1f} s to end"
        # after close: refused at once, each the same way
        for call in (
            lambda: client.invoke("demo", "echo", value=1),
            lambda: client.status(handles[0].id),
            lambda: handles[0].result(),
            lambda: handles[1].wait(),
            lambda: anext(handles[2].events()),
            lambda: anext(client.stream("demo", "generate_text", prompt="a")),
        ):
            with pytest.raises(errors.Unavailable, match="closed"):
                await asyncio.wait_for(call(), 1)
    finally:
        for task in tasks.values():
            task.cancel()
        await cancel_what_runs(nats_url, spear.settings.subject_prefix)


@pytest.mark.parametrize("bad", ["a b", "", "x\ty", "a.b", "*", ">", "x" * 129])
async def test_a_handle_on_an_id_that_is_not_one_is_invalid_argument_everywhere(sdk, spear, nats_url, bad):
    """probe29: a handle on an id that cannot be one raised nats-py's BadSubjectError from result(),
    wait() and events() (and SyncHandle.result), where status() says InvalidArgument. Each now
    says what status() says, found before anything is subscribed or sent."""
    with pytest.raises(errors.InvalidArgument) as by_the_server:
        await sdk.status(bad)
    handle = sdk.execution(bad)
    for call in (
        lambda: handle.result(timeout=2),
        lambda: handle.wait(timeout=2),
        lambda: anext(handle.events()),
        lambda: anext(handle.chunks()),
    ):
        with pytest.raises(errors.InvalidArgument) as refused:
            await asyncio.wait_for(call(), 5)
        assert refused.value.message.startswith(by_the_server.value.message)  # (and what it got)
    # told before anything is subscribed or sent: by a client that was never connected too
    with pytest.raises(errors.InvalidArgument):
        await spear_client(nats_url, spear.settings.subject_prefix).execution(bad).result()

    def sync_result() -> None:
        with SyncClient(nats_url, prefix=spear.settings.subject_prefix) as client:
            client.execution(bad).result(timeout=2)

    with pytest.raises(errors.InvalidArgument):
        await asyncio.to_thread(sync_result)


@pytest.mark.parametrize("mode", ["SYNC", "ASYNC"])
async def test_a_call_whose_connection_is_made_again_while_it_waits_is_asked_again(spear, nats_url, mode):
    """probe30: the connection lost and made again while a call waited (a node loss) lost the
    request or its reply, and the call waited out its whole timeout (20 s there). It is asked
    again at once, under its execution id (no longer said to be new): one execution, joined."""
    from tests.stallproxy import StallProxy

    host, port = nats_url.removeprefix("nats://").split(":")
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(StallProxy(host, int(port)).serving())
        sdk = await stack.enter_async_context(Client([proxy.url], prefix=spear.settings.subject_prefix))
        if mode == "ASYNC":
            proxy.stall()  # (the request is held up, and lost with the connection)
            call = asyncio.ensure_future(sdk.submit("demo", "sleep", ms=1, timeout=20))
            await asyncio.sleep(0.3)
        else:  # (asked: its reply, a second later, is held up, and lost with the connection)
            call = asyncio.ensure_future(sdk.invoke("demo", "sleep", ms=1000, timeout=20))
            await asyncio.sleep(0.3)
            proxy.stall()
            await asyncio.sleep(1.0)
        began = time.monotonic()
        proxy.cut()
        proxy.flow()
        answered = await asyncio.wait_for(call, 15)
        assert time.monotonic() - began < 5, "it waited for its timeout"
        if mode == "ASYNC":
            assert await answered.result(timeout=10) == 1
        else:
            assert answered == 1000
        await spear.caught_up()
        [execution] = (await sdk.executions(task_id="demo"))["executions"]  # (asked twice, run once)
        assert execution["status"] == "EXECUTION_STATUS_COMPLETED"


def test_the_sdk_waits_for_a_sync_reply_past_the_gateways_wait_with_its_backoffs():
    """probe31: the SDK's wait left out the backoffs between retries, as the gateway's did."""
    from spear.client.wire import sync_wait

    assert sync_wait(1.0, 0) > 1.0 + 2.0  # (the gateway's grace, by default)
    assert sync_wait(1.0, 3) > 4 * 1.0 + (0.5 + 1 + 2) * 1.2 + 2.0
    assert sync_wait(None, 3) > 300.0  # (no limit given: the function's or the mode's, up to max_wait_ms)


def test_the_sdks_sync_wait_covers_a_long_limit_the_caller_gives_and_is_worked_out_at_once():
    """review30: the wait was cut at the default max_wait_ms (310 s), and the gateway told so, for
    a 600 s limit a gateway with a longer max_wait_ms would have waited for; and 10**9 retries took
    the client minutes to sum their backoffs before the gateway refused them."""
    import time

    from spear.client.wire import sync_wait
    from spear.core.config import RetrySettings
    from spear.service.callerwait import MAX_WAIT_MS

    assert sync_wait(600.0, 0) > 600.0
    began = time.monotonic()
    assert sync_wait(1.0, 10**9) == MAX_WAIT_MS / 1000  # (the most Spear-Wait-Ms may say)
    assert time.monotonic() - began < 0.1
    # the CLI gives the settings it loaded: their backoffs, and their max_wait_ms without a limit
    slow = RetrySettings(initial_backoff_ms=10_000, multiplier=1.0, max_backoff_ms=60_000, jitter=0.0)
    assert sync_wait(1.0, 2, slow) > 3 * 1.0 + 2 * 10.0
    assert sync_wait(None, 0, None, 900_000) > 900.0
    # the retries not given: the function's own (probe33: 3 declared, given up on after one attempt)
    assert sync_wait(4.0, None) > 4 * 4.0 + (0.5 + 1 + 2) * 1.2 + 10 and sync_wait(4.0, None) >= 300.0


async def test_the_sdk_tells_a_gateway_allowing_long_waits_to_wait_for_the_whole_limit(settings, nats_url):
    """review30, end to end: a gateway whose max_wait_ms is 900000 (15 min) would wait out a
    function with a 10 min limit; the SDK's invoke asked it (Spear-Wait-Ms, which the gateway
    honours) to wait 310 s. The header is read off the wire by a subscriber beside the gateway."""
    from contextlib import AsyncExitStack

    import nats

    from spear.client import Client
    from spear.core.config import with_overrides
    from tests.conftest import start_spear

    settings = with_overrides(settings, sync_execution={"max_wait_ms": 900_000})
    async with AsyncExitStack() as stack:
        running = await start_spear(stack, settings)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()
        watcher = await nats.connect(nats_url)
        stack.push_async_callback(watcher.close)

        async def on_request(msg) -> None:
            if not seen.done():
                seen.set_result(dict(msg.headers or {}))

        await watcher.subscribe(running.names.api("invoke_function"), cb=on_request)
        await watcher.flush()
        sdk = await stack.enter_async_context(Client(nats_url, prefix=settings.subject_prefix))
        assert await sdk.invoke("demo", "sleep", ms=1, timeout=600) == 1
        headers = await asyncio.wait_for(seen, 10)
    asked_ms = int(headers["Spear-Wait-Ms"])
    assert asked_ms >= 600_000, f"the SDK asks the gateway to wait {asked_ms} ms for a 600 s function"


async def test_a_client_used_in_a_second_event_loop_says_so_and_connects_there_again(spear, nats_url):
    """probe33: a Client connected under one asyncio.run() and used under another waited out every
    timeout, then blamed the server (DeadlineExceeded); `async with` in the new loop hung too."""
    client = Client(nats_url, prefix=spear.settings.subject_prefix)

    async def first() -> Any:
        await client.connect()
        return await client.invoke("demo", "echo", value=1)

    async def second() -> tuple[str, Any]:
        began = time.monotonic()
        with pytest.raises(errors.FailedPrecondition) as refused:
            await client.health()
        assert time.monotonic() - began < 1
        async with client:  # connects again in this loop
            return str(refused.value), await client.invoke("demo", "echo", value=2)

    def script() -> tuple[Any, tuple[str, Any]]:  # (in a thread: the test's own loop serves spear)
        return asyncio.run(first()), asyncio.run(second())

    answered_first, (said, answered) = await asyncio.to_thread(script)
    assert answered_first == 1 and "another event loop" in said and answered == 2


def _connections_to(port: int) -> int:
    """Established TCP connections (of this machine) to a local port, from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


async def test_connects_made_at_once_make_one_connection(spear, nats_url):
    """probe33: five concurrent `connect()` calls opened five connections; four stayed open after
    `close()`."""
    port = int(nats_url.rsplit(":", 1)[1])
    before = _connections_to(port)
    client = Client(nats_url, prefix=spear.settings.subject_prefix)
    await asyncio.gather(*(client.connect() for _ in range(5)))
    try:
        assert _connections_to(port) == before + 1
        assert await client.invoke("demo", "echo", value=1) == 1
    finally:
        await client.close()
    await asyncio.sleep(0.2)
    assert _connections_to(port) == before


async def test_options_and_a_prefix_that_cannot_be_used_are_refused_naming_them(spear, nats_url):
    """probe33: `timeout="5"` was a bare TypeError, `wait=-1` an error about a header the caller
    never set, `wait=0` and `timeout=0` silently the default; a prefix `a b` reached nats-py,
    and `>` looked like an unreachable server."""
    async with Client(nats_url, prefix=spear.settings.subject_prefix) as sdk:
        for options, named in (
            ({"timeout": "5"}, "timeout"),
            ({"timeout": 0}, "timeout"),
            ({"timeout": True}, "timeout"),
            ({"wait": -1}, "wait"),
            ({"wait": 0}, "wait"),
            ({"wait": 0.0009}, "wait"),
            ({"wait": float("nan")}, "wait"),
        ):
            with pytest.raises(errors.InvalidArgument, match=f"^INVALID_ARGUMENT: {named} must be") as refused:
                await sdk.invoke("demo", "echo", value=1, **options)
            assert "Spear-Wait-Ms" not in str(refused.value)
        assert await sdk.invoke("demo", "echo", value=1, timeout=5, wait=30) == 1
    for prefix in ("a b", ">", "spear.", "spear\n", "x" * 33):
        with pytest.raises(ValueError, match="prefix"):
            Client(nats_url, prefix=prefix)


async def test_a_sync_call_ended_by_close_names_its_execution(spear, nats_url):
    """probe33: `SyncClient.invoke` ended by a `close()` from another thread raised Unavailable
    naming no execution (Client's own did), so the caller could not follow it up."""

    def script() -> errors.Unavailable:
        client = SyncClient(nats_url, prefix=spear.settings.subject_prefix)
        caught: list[errors.Unavailable] = []

        def call() -> None:
            try:
                client.invoke("demo", "sleep", ms=3000)
            except errors.Unavailable as exc:
                caught.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        client.close()
        caller.join(10)
        return caught[0]

    ended = await asyncio.to_thread(script)
    assert ended.execution_id, ended
    reply, _ = await spear.call(spear.nc, "get_execution_status", {"execution_id": ended.execution_id})
    assert reply["found"] is True


async def test_a_sync_client_made_before_a_fork_says_so_in_the_child(spear, nats_url):
    """probe33: used in a forked child (multiprocessing's default start on Linux, gunicorn
    --preload), a SyncClient hung for ever: its loop's thread is not in the child."""
    code = """if True:
        import os, sys
        from spear import SyncClient, errors
        client = SyncClient(sys.argv[1], prefix=sys.argv[2])
        pid = os.fork()
        if pid == 0:
            try:
                client.health()
                print("child: answered", flush=True)
            except errors.FailedPrecondition as exc:
                print("child:", exc, flush=True)
            client.close()  # (as leaving `with SyncClient(...)` does: review31 saw it hang)
            print("child: closed", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent:", client.health()["status"], flush=True)
        client.close()
    """
    exit_code, said = await _run_script(code, nats_url, spear.settings.subject_prefix)
    assert exit_code == 0 and "child: FAILED_PRECONDITION: this SyncClient was made before a fork" in said, said
    assert "parent: healthy" in said and "child: closed" in said, said


async def test_a_connect_given_up_on_or_closed_meanwhile_leaves_no_connection_open(spear, nats_url):
    """review31: the connection is made in a future of its own, shared by the callers; a
    `connect()` cancelled meanwhile left it made and unowned (the next one made another, `close()`
    closed only that), and a `close()` during a `connect()` left the one made after it open."""
    port = int(nats_url.rsplit(":", 1)[1])
    before = _connections_to(port)
    client = Client(nats_url, prefix=spear.settings.subject_prefix)
    attempt = asyncio.ensure_future(client.connect())
    await asyncio.sleep(0)  # under way
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await asyncio.sleep(0.5)
    await client.connect()
    assert _connections_to(port) == before + 1
    await client.close()
    await asyncio.sleep(0.3)
    assert _connections_to(port) == before

    client = Client(nats_url, prefix=spear.settings.subject_prefix)
    attempt = asyncio.ensure_future(client.connect())
    await asyncio.sleep(0)
    await client.close()
    await asyncio.gather(attempt, return_exceptions=True)
    await asyncio.sleep(0.5)
    assert _connections_to(port) == before


async def test_connect_after_a_close_during_a_connect_gives_a_usable_client(spear, nats_url):
    """review32: connect() (under way) -> close() -> connect(): the second connect shared the first's
    pending future, whose done-callback was bound to the *first* Closing (now done), so `_made`
    closes the connection that the second connect then installs and returns."""
    client = Client(nats_url, prefix=spear.settings.subject_prefix)
    first = asyncio.ensure_future(client.connect())
    await asyncio.sleep(0)  # under way
    await client.close()  # given up on: the client is closed
    await client.connect()  # and connected again: this one must be usable
    try:
        health = await client.health()
        assert health["status"] == "healthy", health
    finally:
        await asyncio.gather(first, return_exceptions=True)
        await client.close()


async def test_connect_after_a_close_during_a_connect_leaves_no_closed_connection(spear, nats_url):
    """The same, asserted on the connection itself: connect() returned a client whose `nc` is
    closed (or closing) just after it returned."""
    client = Client(nats_url, prefix=spear.settings.subject_prefix)
    first = asyncio.ensure_future(client.connect())
    await asyncio.sleep(0)
    await client.close()
    await client.connect()
    await asyncio.sleep(0.3)
    try:
        assert client._nc is not None and client._nc.is_connected, "connect() returned; its connection was closed"
    finally:
        await asyncio.gather(first, return_exceptions=True)
        await client.close()


async def test_a_sync_call_interrupted_before_the_loop_ran_it_is_never_sent(spear, nats_url, client):
    """CI: Ctrl-C landed while the client's loop had not yet run the call just handed to it; the
    call started afterwards and sent its request all the same (and showed in flight after the
    interruption). A call given up before it ran never runs."""
    execution_id = "interrupted-" + uuid.uuid4().hex[:8]
    code = """if True:
        import os, signal, sys, threading, time
        from spear import SyncClient
        client = SyncClient(sys.argv[1], prefix=sys.argv[2])
        client._loop.call_soon_threadsafe(time.sleep, 1.5)  # the loop busy: the call waits its turn
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            client.invoke("demo", "echo", execution_id=sys.argv[3], value=1)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        time.sleep(2.5)  # (the loop free again: a call that was to run has run)
        print("in flight:", len(client._in_flight), flush=True)
        client.close()
    """
    exit_code, said = await _run_script(code, nats_url, spear.settings.subject_prefix, execution_id)
    assert exit_code == 0 and "interrupted" in said and "in flight: 0" in said, said
    reply, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
    assert reply["found"] is False, reply


async def test_a_sync_call_interrupted_within_its_hand_off_to_the_loop_is_never_sent(spear, nats_url, client):
    """CI: Ctrl-C landed inside the hand-off of a stream's next item to the client's loop, the
    call already queued there but its future not yet the waiting thread's to abandon: it ran all
    the same, in flight after the interruption. The SIGINT is a real one, sent as the hand-off's
    `call_soon_threadsafe` returns (its handler raises at once, there); the loop busy meanwhile,
    the call cannot have run before it is given up."""
    execution_id = "handed-" + uuid.uuid4().hex[:8]
    code = """if True:
        import os, signal, sys, time, traceback
        from spear import SyncClient
        client = SyncClient(sys.argv[1], prefix=sys.argv[2])
        client._loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop busy: the call waits its turn
        def interrupt_as_it_returns(frame, event, arg):
            if event == "return":
                sys.settrace(None)
                os.kill(os.getpid(), signal.SIGINT)
        def tracer(frame, event, arg):
            return interrupt_as_it_returns if frame.f_code.co_name == "call_soon_threadsafe" else None
        sys.settrace(tracer)
        try:
            client.invoke("demo", "echo", execution_id=sys.argv[3], value=1)
        except KeyboardInterrupt as interrupted:
            print("interrupted in", traceback.extract_tb(interrupted.__traceback__)[-2].name, flush=True)
        time.sleep(2.0)  # (the loop free again: a call that was to run has run)
        print("in flight:", len(client._in_flight), flush=True)
        client.close()
    """
    exit_code, said = await _run_script(code, nats_url, spear.settings.subject_prefix, execution_id)
    assert exit_code == 0 and "interrupted in" in said and "in flight: 0" in said, said
    reply, _ = await spear.call(client, "get_execution_status", {"execution_id": execution_id})
    assert reply["found"] is False, reply


async def test_a_sync_client_whose_thread_starts_late_connects(spear, nats_url, monkeypatch):
    """CI: on a loaded machine the loop's thread had not started running it when the new client
    connected, which then said "the client is closed: use a new SyncClient"."""
    import time as time_module

    run_forever = asyncio.BaseEventLoop.run_forever

    def late(loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread().name == "spear-sync-client":
            time_module.sleep(0.3)  # (the client's thread is slow to get here)
        run_forever(loop)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_forever", late)

    def use() -> object:
        with SyncClient(nats_url, prefix=spear.settings.subject_prefix) as client:
            return client.invoke("demo", "echo", value=1)

    assert await asyncio.wait_for(asyncio.to_thread(use), 30) == 1
