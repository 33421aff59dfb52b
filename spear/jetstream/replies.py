"""Where spear's components answer requests: never on a subject that stores something.

A request's reply subject is the requester's to choose, and a component publishes its answer
with its own NATS permissions. Under `spear up --secure` those include appending to the log
(`P.append.>`), to the task registry (`P.append_task.>`) and writing buckets (`$KV.>`): a client
naming one of those as its reply had a component store its answer there (a probe: a forged
`requested` became a POISON execution, an execution id was squatted so that its owner's call was
refused, a junk registry event logged an error four times a second). So an answer goes only to a
subject outside the prefixes components protect (`protect`) and the server's own (`$…`): an
inbox, whatever its prefix (`_INBOX.…` by default).

nats-py's `Msg.respond` and nats.micro's `Request.respond` are guarded in this process once a
component protects a prefix: the $SRV handlers nats.micro installs answer through them, and no
other hook reaches those.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.micro.request import Request

log = logging.getLogger(__name__)

_protected: set[str] = set()  # the first tokens of the subjects no answer may go to


def protect(prefix: str) -> None:
    """From now on, no answer of this process goes to a subject of `prefix` or of the server."""
    _protected.add(prefix)
    _guard(Msg, lambda msg: msg.reply)
    _guard(Request, lambda request: request._msg.reply)


def answerable(reply: str) -> bool:
    """Whether an answer may be published on `reply`."""
    return bool(reply) and not reply.startswith("$") and reply.split(".", 1)[0] not in _protected


def _guard(kind: type[Any], reply_of: Callable[[Any], str]) -> None:
    respond: Callable[..., Awaitable[None]] = kind.respond
    if getattr(respond, "guarded", False):
        return

    @functools.wraps(respond)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> None:
        reply = reply_of(self) or ""
        if reply and not answerable(reply):
            log.debug("not answering on %r: a subject spear stores or the server's", reply)
            return
        await respond(self, *args, **kwargs)

    guarded.guarded = True  # type: ignore[attr-defined]
    kind.respond = guarded
