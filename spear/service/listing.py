"""ListExecutions (and a task's newest executions), read from an index the log already keeps.

Every execution has exactly one `requested` event, stored when it was accepted, until retention
removes its events together with its state. Those events, in stream order, are the executions in
the order they were accepted: a page is a walk over them (batched direct gets filtered by subject,
`P.exec.<task or *>.*.requested`), newest first or oldest first, plus one `multi_last` read of the
state bucket for the executions on it. A call reads O(page) messages, not one per retained
execution (a scan of 100,000 states took ~6 s and grew the reader by ~30 MB). A filter the subject
cannot express (function, status) looks at no more than SCAN_LIMIT executions per call, then
answers with what it found, `has_more`, and `next_start_after` where it stopped.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import msgspec
from nats.aio.client import Client

from spear.core.contract import ListExecutionsRequest, ListExecutionsResponse
from spear.core.convert import execution_info
from spear.core.enums import ApiError, ErrorCode, ExecutionStatus
from spear.core.events import BadEvent, decode_event
from spear.core.names import Names
from spear.core.state import ExecutionState, apply
from spear.jetstream import directget
from spear.jetstream.directget import Found
from spear.service.views import state_of

SCAN_LIMIT = 10_000  # executions one call looks at, at most, for filters the subject cannot hold
# The newest-first walk reads this many stream sequences per execution the page wants first (an
# execution has three events or more), then windows four times the one before.
WINDOW_PER_EXECUTION = 4


class _Named(msgspec.Struct):
    """The one field of a `requested` event a function filter needs (the rest is skipped)."""

    function_name: str = ""


_named = msgspec.json.Decoder(_Named)


async def list_page(
    nc: Client, names: Names, request: ListExecutionsRequest, status: ExecutionStatus | None, timeout: float
) -> ListExecutionsResponse:
    """One page of executions in the order they were accepted, newest first unless `order` is
    "asc"; `start_after` (exclusive) is an execution of an earlier page."""
    subject_filter = names.event(request.task_id or "*", "*", "requested")
    after = await _cursor(nc, names, request.start_after, timeout) if request.start_after else None
    walk = (
        _newest_first(nc, names, subject_filter, after, WINDOW_PER_EXECUTION * (request.limit + 1), timeout)
        if request.order == "desc"
        else _oldest_first(nc, names, subject_filter, after or 0, timeout)
    )
    page: list[ExecutionState] = []
    looked, last_looked = 0, ""
    async with aclosing(walk):
        async for chunk in walk:
            looked += len(chunk)
            last_looked = names.event_execution_id(chunk[-1].subject)
            if request.function_name:
                chunk = [found for found in chunk if _function_of(found) == request.function_name]
            while chunk:  # the states of as many as the page may still take (all, if none is left out)
                wanted = max(32, request.limit + 1 - len(page))
                part, chunk = chunk[:wanted], chunk[wanted:]
                states = await _states(nc, names, part, timeout)
                for found in part:
                    state = states.get(names.event_execution_id(found.subject))
                    if state is not None and (status is None or state.status == status):
                        page.append(state)
                    if len(page) > request.limit:
                        shown = page[: request.limit]
                        return _response(shown, True, shown[-1].execution_id)
            if looked >= SCAN_LIMIT:  # enough for one call: the caller goes on from here
                return _response(page, True, last_looked)
    return _response(page, False, "")


def _response(page: list[ExecutionState], has_more: bool, cursor: str) -> ListExecutionsResponse:
    return ListExecutionsResponse(
        executions=[execution_info(state) for state in page], has_more=has_more, next_start_after=cursor
    )


async def _cursor(nc: Client, names: Names, execution_id: str, timeout: float) -> int:
    """The stream sequence of the `requested` event of the page's `start_after` execution."""
    found = await directget.newest(nc, names.stream, names.event("*", execution_id, "requested"), timeout)
    if found is None:
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"start_after: there is no execution {execution_id!r} (it may have expired): list from the start",
        )
    return found.seq


async def _oldest_first(
    nc: Client, names: Names, subject_filter: str, after_seq: int, timeout: float
) -> AsyncGenerator[list[Found], None]:
    """The `requested` events after `after_seq`, oldest first, a batch at a time."""
    start = after_seq + 1
    while True:
        batch = await directget.read_batch(nc, names.stream, subject_filter, start, timeout)
        if batch:
            yield batch
        if len(batch) < directget.BATCH:
            return
        start = batch[-1].seq + 1


async def _newest_first(
    nc: Client, names: Names, subject_filter: str, before_seq: int | None, first_window: int, timeout: float
) -> AsyncGenerator[list[Found], None]:
    """The `requested` events before `before_seq` (None: all), newest first: direct gets only
    read forward, so windows of the stream are read from the end backwards, the first of
    `first_window` sequences, each next four times the one before (a task with few executions is
    found in a few reads, not one per window)."""
    if before_seq is None:
        newest = await directget.newest(nc, names.stream, subject_filter, timeout)
        end = newest.seq if newest is not None else 0
    else:
        end = before_seq - 1
    window = first_window
    while end >= 1:
        low = max(1, end - window + 1)
        found: list[Found] = []
        start = low
        while start <= end:
            batch = await directget.read_batch(nc, names.stream, subject_filter, start, timeout)
            found += [message for message in batch if message.seq <= end]
            if len(batch) < directget.BATCH or batch[-1].seq >= end:
                break
            start = batch[-1].seq + 1
        if found:
            yield found[::-1]
        end, window = low - 1, window * 4


def _function_of(found: Found) -> str:
    try:
        return _named.decode(found.data).function_name
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return ""


async def _states(nc: Client, names: Names, requested: list[Found], timeout: float) -> dict[str, ExecutionState]:
    """The current state of each execution of `requested`: the projection's, else (not projected
    yet) the state its `requested` event alone gives, PENDING. An execution whose `requested`
    cannot be read and that has no state yet is left out (the projection records it as poison)."""
    if not requested:
        return {}
    bucket = names.state_bucket
    ids = [names.event_execution_id(found.subject) for found in requested]
    stored = await directget.newest_of(nc, f"KV_{bucket}", [f"$KV.{bucket}.exec.{i}" for i in ids], timeout)
    states = {state.execution_id: state for found in stored if (state := state_of(found)) is not None}
    for execution_id, found in zip(ids, requested, strict=True):
        if execution_id not in states:
            try:
                state = apply(None, decode_event(found.data, found.subject), found.seq)
            except BadEvent:
                continue
            if state is not None:
                states[execution_id] = state
    return states
