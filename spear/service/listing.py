"""ListExecutions (and a task's newest executions), read from an index the log already keeps.

Every execution has exactly one `requested` event, stored when it was accepted, until retention
removes its events together with its state. Those events, in stream order, are the executions in
the order they were accepted: a page is a walk over them (batched direct gets filtered by subject,
`P.exec.<task or *>.*.requested`, or oldest first while they are dense, of every event),
newest first or oldest first, plus `multi_last` reads of the
state bucket for the executions on it. Without a function or status filter a call reads O(page)
messages, not one per retained execution (a scan of 100,000 states took ~6 s and grew the reader
by ~30 MB). A filter the subject cannot express (function, status) looks at no more than
SCAN_LIMIT executions per call, then answers with what it found, `has_more`, and
`next_start_after` = the last execution it looked at. What a call holds at once is bounded too:
a window of at most MAX_WINDOW stream sequences, kept as (sequence, id, function, small body).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import NamedTuple

import msgspec
from nats.aio.client import Client

from spear.core.contract import ListExecutionsRequest, ListExecutionsResponse, timestamps
from spear.core.convert import execution_info
from spear.core.enums import ApiError, ErrorCode, ExecutionStatus
from spear.core.events import AnyEvent, BadEvent, decode_event
from spear.core.eventstore import StoreUnavailable
from spear.core.ids import creation_ms
from spear.core.names import Names
from spear.core.state import ExecutionState, apply
from spear.jetstream import directget, leaderget, topology
from spear.jetstream.directget import Found
from spear.projection.retention import Expired
from spear.service.views import state_of

SCAN_LIMIT = 10_000  # executions one call looks at, at most, for filters the subject cannot hold
# The newest-first walk reads this many stream sequences per execution the page wants first (an
# execution has three events or more), then windows four times the one before, up to MAX_WINDOW.
WINDOW_PER_EXECUTION = 4
HELD_AT_ONCE = 32  # executions whose states are read together (one `multi_last`), at least
MAX_WINDOW = 16 * directget.BATCH
SPARSE = 16  # oldest first, a batch of every event with fewer than 1 in this many wanted: filter
UNFILTERED_BYTES = 256 * 1024  # ... or one cut short by this many bytes (256 events of ~1 KB)
KEPT_BODY_BYTES = 2048  # a `requested` body kept for a page (a bigger one is read again if needed)


class _Named(msgspec.Struct):
    """The one field of a `requested` event a function filter needs (the rest is skipped)."""

    function_name: str = ""


_named = msgspec.json.Decoder(_Named)


class Accepted(NamedTuple):
    """An execution's `requested` event, as much of it as a page needs to hold."""

    seq: int
    subject: str
    execution_id: str
    function_name: str  # "" if the body cannot be read
    body: bytes  # b"" if bigger than KEPT_BODY_BYTES


def _accepted(found: Found, names: Names) -> Accepted:
    try:
        function_name = _named.decode(found.data).function_name
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        function_name = ""
    body = found.data if len(found.data) <= KEPT_BODY_BYTES else b""
    return Accepted(found.seq, found.subject, names.event_execution_id(found.subject), function_name, body)


async def list_page(
    nc: Client, names: Names, request: ListExecutionsRequest, status: ExecutionStatus | None, timeout: float
) -> ListExecutionsResponse:
    """One page of executions in the order they were accepted, newest first unless `order` is
    "asc"; `start_after` (exclusive) is an execution of an earlier page."""
    subject_filter = names.event(request.task_id or "*", "*", "requested")
    newest_first = request.order == "desc"
    position = await _cursor(nc, names, subject_filter, request.start_after, newest_first, timeout)
    walk = (
        _newest_first(
            nc, names, subject_filter, position, WINDOW_PER_EXECUTION * max(request.limit + 1, HELD_AT_ONCE), timeout
        )
        if newest_first
        else _oldest_first(nc, names, subject_filter, request.task_id, position or 0, timeout)
    )
    page: list[ExecutionState] = []
    held: list[Accepted] = []  # looked at, states not read yet
    looked = 0

    async def take_held() -> bool:
        """Read the states of the held executions into the page; True once it is full."""
        states = await _states(nc, names, held, timeout)
        for accepted in held:
            state = states.get(accepted.execution_id)
            if state is not None and (status is None or state.status == status):
                page.append(state)
        held.clear()
        return len(page) > request.limit

    async with aclosing(walk):
        async for accepted in walk:
            looked += 1
            if not request.function_name or accepted.function_name == request.function_name:
                held.append(accepted)
            if (
                len(held) >= max(HELD_AT_ONCE, request.limit + 1 - len(page)) or looked >= SCAN_LIMIT
            ) and await take_held():
                shown = page[: request.limit]
                return _response(shown, True, shown[-1].execution_id)
            if looked >= SCAN_LIMIT:  # enough for one call: the caller goes on from here
                return _response(page, True, accepted.execution_id)
    if await take_held():
        shown = page[: request.limit]
        return _response(shown, True, shown[-1].execution_id)
    return _response(page, False, "")


def _response(page: list[ExecutionState], has_more: bool, cursor: str) -> ListExecutionsResponse:
    return ListExecutionsResponse(
        executions=[execution_info(state) for state in page], has_more=has_more, next_start_after=cursor
    )


async def _cursor(
    nc: Client, names: Names, subject_filter: str, execution_id: str, newest_first: bool, timeout: float
) -> int | None:
    """Where the page starts: the stream sequence of the `start_after` execution's `requested`
    event (None without one). A replica that has not applied it yet is asked no further: the
    stream's leader answers. One that expired since (a newest-first page's last execution is the
    next one retention removes) is placed where its expired marker says its `requested` was; a
    marker gone too, by the time in its id if it is a ULID (executions accepted in the same
    millisecond may then be listed again, none left out); an older version's marker, which does
    not say, by the time its execution ended."""
    if not execution_id:
        return None
    subject = names.event("*", execution_id, "requested")
    found = await directget.newest(nc, names.stream, subject, timeout)
    found = found or await leaderget.last_by_subject(nc, names.stream, subject, timeout)
    if found is not None:
        return found.seq
    bucket = names.state_bucket
    marker = await directget.newest(nc, f"KV_{bucket}", f"$KV.{bucket}.{names.expired_key(execution_id)}", timeout)
    try:
        expired = msgspec.json.decode(marker.data, type=Expired) if marker is not None and marker.data else None
    except msgspec.DecodeError:
        expired = None
    if expired is not None and expired.requested_seq > 0:
        return expired.requested_seq
    made_ms = creation_ms(execution_id)
    if made_ms is None and expired is not None:
        # A marker of a version before markers said where the `requested` was, and an id with no
        # time in it: newest first, what was accepted before the execution ended (it was accepted
        # before that: some may be listed again, none left out); oldest first, from the oldest
        # execution kept (retention removes the oldest first: few are listed again).
        if not newest_first:
            return 0
        ended_s = timestamps.timestamp_or_none(expired.completed_at)
        made_ms = int(ended_s * 1000) if ended_s is not None else None
    if made_ms is None:
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"start_after: there is no execution {execution_id!r} (it may have expired): list from the start",
        )
    # Newest first: what was accepted before the next millisecond; oldest first: from its own.
    since_ms = made_ms + 1 if newest_first else made_ms
    since = datetime.datetime.fromtimestamp(since_ms / 1000, datetime.UTC).isoformat().replace("+00:00", "Z")
    request = {"start_time": since, "next_by_subj": subject_filter, "batch": 1}
    later = (await directget.read_request(nc, names.stream, request, timeout)).found
    if later:  # newest first: the executions before it; oldest first: it and those after
        return later[0].seq if newest_first else later[0].seq - 1
    if not newest_first:
        newest = await directget.newest(nc, names.stream, subject_filter, timeout)
        return newest.seq if newest is not None else 0  # nothing was accepted after it
    return None  # every execution is older: all of them, newest first


async def _oldest_first(
    nc: Client, names: Names, subject_filter: str, task_id: str, after_seq: int, timeout: float
) -> AsyncGenerator[Accepted, None]:
    """The `requested` events after `after_seq` (of `task_id`; "": any task), oldest first.

    Read in batches of every event while those hold enough of what is wanted: a subject-filtered
    batch costs the server a look at every subject its filter matches after the batch's start
    (~40–75 ms a batch with 300,000 executions, and more the more there are), an unfiltered one
    does not. Where wanted events are sparse (another task's, a long stream of chunks), the
    server filters from there on."""
    start = after_seq + 1
    filtered = False
    few_tried = not task_id  # whether the task's executions were asked for all at once
    while True:
        if filtered:
            batch = await directget.read_batch(nc, names.stream, subject_filter, start, timeout)
            wanted = batch.found
        else:
            batch = await directget.read_batch(nc, names.stream, ">", start, timeout, max_bytes=UNFILTERED_BYTES)
            wanted = [found for found in batch.found if _is_requested(found.subject, task_id)]
            # Sparse by count, or by bytes: a batch cut short by its byte bound holds big events
            # (results, logs) that a page does not want; read on, they would cost the gateway
            # gigabytes over SCAN_LIMIT executions (a review: 270 MB for 300 of 900 KB each).
            cut_short = batch.more and len(batch.found) < directget.BATCH
            filtered = cut_short or len(wanted) * SPARSE < len(batch.found)
        if not wanted and not few_tried and batch.more:  # (at the stream's end the walk ends anyway)
            few_tried = True
            every = await _all_if_few(nc, names, subject_filter, timeout)
            if every is not None:  # all the task's executions: the walk ends with those from here
                for found in every:
                    if found.seq >= start:
                        yield _accepted(found, names)
                return
        for found in wanted:
            yield _accepted(found, names)
        if not batch.more or not batch.found:
            return
        start = batch.found[-1].seq + 1


def _is_requested(subject: str, task_id: str) -> bool:
    """Whether an event's subject (`P.exec.<task>.<id>.<kind>`: five tokens, as the prefix and ids
    hold no dot) is a `requested` of `task_id` ("": of any task), as the server's subject filter
    `P.exec.<task or *>.*.requested` says (a subject of other depth, which only a component could
    append, matches neither)."""
    tokens = subject.split(".")
    return len(tokens) == 5 and tokens[4] == "requested" and (not task_id or tokens[2] == task_id)


async def _newest_first(
    nc: Client, names: Names, subject_filter: str, before_seq: int | None, first_window: int, timeout: float
) -> AsyncGenerator[Accepted, None]:
    """The `requested` events before `before_seq` (None: all), newest first: direct gets only
    read forward, so windows of the stream are read from the end backwards, the first of
    `first_window` sequences, each next four times the one before up to MAX_WINDOW (a task with
    few executions is found in a few reads, not one per window)."""
    if before_seq is None:
        # From the stream's last message (one read, any replica): the newest `requested` matching
        # a filter costs the server a look at every subject it matches (~115 ms for a task with
        # 1,000,000 executions). A task not met in the first window is found that way, in one read
        # rather than window after window.
        newest = await directget.newest(nc, names.stream, ">", timeout)
        end = newest.seq if newest is not None else await _last_seq(nc, names, timeout)
    else:
        end = before_seq - 1
    floor = 1  # below the stream's oldest message nothing is left: read once a window comes up short
    one_task = subject_filter != names.event("*", "*", "requested")
    may_jump = before_seq is None and one_task
    few_tried = not one_task  # whether the task's executions were asked for all at once
    window = min(first_window, MAX_WINDOW)
    while end >= floor:
        low = max(floor, end - window + 1)
        found: list[Accepted] = []
        start = low
        while start <= end:
            # (no more than the window can hold: a filter that matches nothing in it would
            # otherwise bring a whole batch from beyond its end, where the walk has been)
            batch = await directget.read_batch(nc, names.stream, subject_filter, start, timeout, end - start + 1)
            found += [_accepted(message, names) for message in batch.found if message.seq <= end]
            if not batch.more or not batch.found or batch.found[-1].seq >= end:
                break
            start = batch.found[-1].seq + 1
        for accepted in reversed(found):
            yield accepted
        if not found and may_jump:  # the task's newest execution is further back: jump to it
            may_jump = False
            newest = await directget.newest(nc, names.stream, subject_filter, timeout)
            low = min(low, newest.seq + 1) if newest is not None else floor
        elif not found and not few_tried and low > floor:
            # A stretch without the task (after the jump, if any: a task with many executions met
            # there fills the page by windows, without the refused read of all of them).
            few_tried = True
            every = await _all_if_few(nc, names, subject_filter, timeout)
            if every is not None:  # all the task's executions: the walk ends with those before it
                for message in reversed(every):
                    if message.seq < low:
                        yield _accepted(message, names)
                return
        if floor == 1 and low > 1:  # retention removed the stream's old end: stop where it begins
            oldest = await directget.oldest(nc, names.stream, ">", timeout)
            floor = oldest.seq if oldest is not None else end + 1
        end, window = low - 1, min(window * 4, MAX_WINDOW)


async def _last_seq(nc: Client, names: Names, timeout: float) -> int:
    """The stream's last sequence, from its info: where the newest message is gone (retention
    purged the newest executions), nats-server answers a direct get of the last message of `>`
    with nothing, and a list once stopped there, empty, with older executions still running (a
    probe). The walk reads down from here; deleted sequences read as nothing."""
    info = await topology.api_request(nc, f"STREAM.INFO.{names.stream}", None, timeout)
    return int(info.get("state", {}).get("last_seq", 0))


async def _all_if_few(nc: Client, names: Names, subject_filter: str, timeout: float) -> list[Found] | None:
    """Every `requested` event of a task, oldest first, if it has at most one batch of them
    (`multi_last`: each is the one message of its subject), else None. A task whose executions
    are few and far between was found window by window, each read costing the server a look at
    the window's messages: 1.5 s a page for a task with 2 of 400,000 executions (a probe saw 4.4
    s); read so, 0.6 ms. A task with many costs the server ~150 ms to say it has too many."""
    request = {"multi_last": [subject_filter], "batch": directget.BATCH}
    try:
        batch = await directget.read_request(nc, names.stream, request, timeout)
    except StoreUnavailable:  # 413: too many to answer at once (or no answer: the walk will say)
        return None
    return None if batch.more else batch.found


async def _states(nc: Client, names: Names, held: list[Accepted], timeout: float) -> dict[str, ExecutionState]:
    """The current state of each execution of `held`: the projection's, else (not projected yet)
    the state its `requested` event alone gives, PENDING. An execution whose `requested` cannot be
    read and that has no state yet is left out (the projection records it as poison)."""
    if not held:
        return {}
    bucket = names.state_bucket
    subjects = [f"$KV.{bucket}.exec.{accepted.execution_id}" for accepted in held]
    stored = await directget.newest_of(nc, f"KV_{bucket}", subjects, timeout)
    states = {state.execution_id: state for found in stored if (state := state_of(found)) is not None}
    for accepted in held:
        if accepted.execution_id not in states:
            state = await _from_requested(nc, names, accepted, timeout)
            if state is not None:
                states[accepted.execution_id] = state
    return await _brought_up_to_date(nc, names, states, timeout)


# The kinds that move an execution's status: a page folds the newest of each that the projection
# has not (the log's newest `log` and `chunk` events, which may be large, change no status).
STATUS_KINDS = ("started", "retrying", "released", "cancel_requested", "completed", "failed", "timed_out", "cancelled")


async def _brought_up_to_date(
    nc: Client, names: Names, states: dict[str, ExecutionState], timeout: float
) -> dict[str, ExecutionState]:
    """`states`, those not ended brought up to the log: the projection folds within its linger,
    and a list read right after a SYNC call's reply showed the execution PENDING (probe42: 111 of
    ~200). A `multi_last` of their status events (per 32 of them: `directget.BATCH` subjects)."""
    subjects = [
        names.event(state.task_id, state.execution_id, kind)
        for state in states.values()
        if not state.terminal
        for kind in STATUS_KINDS
    ]
    if not subjects:
        return states
    newer: dict[str, list[tuple[int, AnyEvent]]] = {}
    for found in await directget.newest_of(nc, names.stream, subjects, timeout):
        execution_id = names.event_execution_id(found.subject)
        if execution_id in states and found.seq > states[execution_id].last_seq:
            try:
                newer.setdefault(execution_id, []).append((found.seq, decode_event(found.data, found.subject)))
            except BadEvent:
                continue  # (the projection records it)
    for execution_id, events in newer.items():
        state: ExecutionState | None = states[execution_id]
        for seq, event in sorted(events, key=lambda pair: pair[0]):
            state = apply(state, event, seq)
        if state is not None:
            states[execution_id] = state
    return states


async def _from_requested(nc: Client, names: Names, accepted: Accepted, timeout: float) -> ExecutionState | None:
    body = accepted.body
    if not body:  # too big to have been kept: read it again
        request = {"seq": accepted.seq, "next_by_subj": accepted.subject, "batch": 1}
        again = (await directget.read_request(nc, names.stream, request, timeout)).found
        if not again or again[0].seq != accepted.seq:
            return None
        body = again[0].data
    try:
        return apply(None, decode_event(body, accepted.subject), accepted.seq)
    except BadEvent:
        return None
