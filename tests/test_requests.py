"""The hot paths' request-reply (spear/jetstream/requests.py) behaves as nats-py's `request`:
each caller gets its own reply, and the same errors for no responder and no answer in time."""

import asyncio

import nats.errors
import pytest

from spear.jetstream import requests


async def test_each_concurrent_request_gets_its_own_reply(client):
    async def echo(msg):
        await msg.respond(b"re:" + msg.data)

    await client.subscribe("lean.echo", cb=echo)
    replies = await asyncio.gather(*(requests.request(client, "lean.echo", b"%d" % i, 5) for i in range(200)))
    assert [reply.data for reply in replies] == [b"re:%d" % i for i in range(200)]


async def test_no_responder_and_no_answer_are_nats_errors(client):
    with pytest.raises(nats.errors.NoRespondersError):
        await requests.request(client, "lean.nobody", b"", 5)

    async def silent(msg):
        return None

    await client.subscribe("lean.silent", cb=silent)
    with pytest.raises(nats.errors.TimeoutError):
        await requests.request(client, "lean.silent", b"", 0.2)

    async def answer(msg):
        await msg.respond(b"ok")

    await client.subscribe("lean.after", cb=answer)  # the connection serves requests after both
    assert (await requests.request(client, "lean.after", b"", 5)).data == b"ok"
