"""Server-Sent Events: stored events as SSE frames (`id:` the stream sequence, `event:` the kind),
keep-alive comments while idle, `Last-Event-ID` to resume, and an end when the server stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from spear.api.http.keys import STOPPING
from spear.core.enums import ApiError, ErrorCode
from spear.service.fanout import Shown

KEEPALIVE_S = 15.0
MAX_SEQUENCE_DIGITS = 20  # a stream sequence is a uint64


def wants_sse(request: web.Request) -> bool:
    """Whether the client asks for an event stream: it names `text/event-stream` and ranks it no
    lower than JSON (probe29: `text/event-stream;q=0` and `application/json, text/event-stream;q=0.1`
    got a stream). A HEAD request gets the headers of the JSON reply, never a stream it would
    hold open."""
    if request.method == "HEAD":
        return False
    ranked = accepted(request.headers.get("Accept", ""))
    sse = ranked.get("text/event-stream")
    if sse is None or sse <= 0:
        return False
    # JSON's rank is that of the most specific range naming it (RFC 9110 §12.5.1), not the highest:
    # `application/json;q=0, */*` refuses JSON
    json_q = next((ranked[name] for name in ("application/json", "application/*", "*/*") if name in ranked), -1.0)
    return sse >= json_q


def accepted(header: str) -> dict[str, float]:
    """The media ranges of an Accept header (lower-cased) and their quality values (RFC 9110
    §12.5.1; a quality that is not a number counts as 0)."""
    ranked: dict[str, float] = {}
    for item in header.split(","):
        media, *parameters = (part.strip() for part in item.split(";"))
        if not media:
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(1.0, max(0.0, float(value.strip())))
                except ValueError:
                    quality = 0.0
        ranked[media.lower()] = quality
    return ranked


def last_event_id(request: web.Request) -> int | None:
    """The stream sequence in `Last-Event-ID` (where to resume), if any."""
    text = request.headers.get("Last-Event-ID", "").strip()
    # (20 digits pass 2^64 - 1, the largest sequence: one above it was waited on for ever, probe57)
    if text and not (text.isascii() and text.isdigit() and len(text) <= MAX_SEQUENCE_DIGITS and int(text) < 1 << 64):
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            "Last-Event-ID must be the stream sequence of an event (a whole number below 2^64)",
        )
    return int(text) if text else None


async def event_stream(
    request: web.Request, events: AsyncIterator[list[Shown] | None], headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """Stored events, shown as readers may see them, as SSE frames (`id:` the stream sequence,
    `event:` the kind), a batch in one write, and keep-alive comments while idle (None), until
    `events` ends, the client goes away or the server stops. The first item is awaited before the
    response starts, so bad input and an unreachable JetStream get the contract's JSON error
    instead of a broken stream."""
    items = aiter(events)
    try:
        first: list[Shown] | None = await anext(items)
        ended = False
    except StopAsyncIteration:
        first, ended = None, True
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        }
    )
    await response.prepare(request)
    # One task writes the whole stream, raced once against the server's stop (not a task and a
    # wait for each batch: ~34 us a wake-up, for every open stream, probe57)
    writing = None if ended else asyncio.ensure_future(_write_all(response, items, first))
    stop = asyncio.ensure_future(request.app[STOPPING].wait())
    try:
        if writing is not None:
            await asyncio.wait({writing, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not writing.done():  # the server is stopping: an open stream must not hold it up
                writing.cancel()
                await asyncio.wait({writing})
            elif (error := writing.exception()) is not None:
                raise error
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away
    finally:
        stop.cancel()
        if writing is not None and not writing.done():  # (this handler was cancelled)
            writing.cancel()
            await asyncio.wait({writing})
        await events.aclose()  # type: ignore[attr-defined]
    return response


async def _write_all(
    response: web.StreamResponse, items: AsyncIterator[list[Shown] | None], batch: list[Shown] | None
) -> None:
    """Write `batch` and every item after it: a batch in one write, None as a keep-alive."""
    while True:
        await response.write(b": keep-alive\n\n" if batch is None else b"".join(shown.frame for shown in batch))
        try:
            batch = await anext(items)
        except StopAsyncIteration:
            return


async def stop_streams(app: web.Application) -> None:
    """On shutdown: open event streams end (they must not hold up a stop)."""
    app[STOPPING].set()
