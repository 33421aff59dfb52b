"""A worker facing a replicated stream's two transient answers ends the execution once, never
drops it.

Seen on a 3-node cluster under load (`test_every_node_of_a_cluster_answers_sync_calls...`, which
then timed out): a follower's consumer delivered `requested` before the stream leader had
applied it, so the leader refused the attempt's fenced `started` with 10164 ("wrong last
sequence", the subject still "in process") and the leader read that followed found no event at
all. The worker took that for "the execution ended meanwhile", acknowledged, and the execution
never ended. Those two answers cannot be provoked on demand on a real cluster, so the store here
gives them (the server's own refusal, through the store's own mapping) once each, then behaves as
the real JetStream store it is."""

from contextlib import AsyncExitStack

from spear.core.eventstore import Stored
from spear.core.names import Names
from spear.demo import demo
from spear.jetstream.connection import connect
from spear.jetstream.errors import append_refusal
from spear.jetstream.store import JetStreamStore
from spear.worker.worker import Worker
from tests.conftest import invoke_body, start_spear


class LaggingReplica(JetStreamStore):
    """The real store, but the first chain of appends is refused as a busy leader refuses it,
    and the next reads miss the execution as a leader that has not applied it yet does."""

    def __init__(self, *args, reads_missed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.refusals_left = 1
        self.misses_left = reads_missed
        self.missed = 0

    async def append_chain(self, events, **kwargs):
        if self.refusals_left:
            self.refusals_left -= 1
            raise append_refusal({"code": 400, "err_code": 10164, "description": "wrong last sequence"})
        return await super().append_chain(events, **kwargs)

    async def last(self, execution_id: str) -> Stored | None:
        if self.misses_left:
            self.misses_left -= 1
            self.missed += 1
            return None
        return await super().last(execution_id)


async def _call_with_lagging_worker(settings, client, reads_missed: int):
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings, with_worker=False)
        nc = await connect(settings, "lagging-worker")
        stack.push_async_callback(nc.close)
        names = Names(settings.subject_prefix)
        store = LaggingReplica(nc, names, 5.0, reads_missed=reads_missed)
        worker = Worker(nc, settings, [demo], store=store)
        await worker.start()
        stack.push_async_callback(worker.stop)
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value=7), timeout=20)
        events = [stored.event.kind for stored in await spear.service.store.history(reply["execution_id"])]
        return reply, events, store


async def test_a_refused_start_then_reads_that_miss_the_execution_still_end_it_once(settings, client):
    reply, events, store = await _call_with_lagging_worker(settings, client, reads_missed=2)
    assert reply["result"]["result"] == 7, reply
    assert events == ["requested", "started", "completed"]  # one attempt, stored once
    assert store.missed == 2  # the worker read again rather than conclude the execution had ended


async def test_a_worker_that_never_sees_the_execution_hands_it_back_instead_of_dropping_it(settings, client):
    # More misses than one delivery reads again: the invocation is handed back (nak), and its next
    # delivery, reading the stream as it is, runs it: still one attempt, one end.
    reply, events, store = await _call_with_lagging_worker(settings, client, reads_missed=8)
    assert reply["result"]["result"] == 7, reply
    assert events == ["requested", "started", "completed"]
    assert store.missed == 8
