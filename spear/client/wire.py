"""The client's side of the wire contract: the InvokeFunctionRequest it sends, how long a SYNC
caller waits, and the typed error (`spear.errors`) a reply or an execution's end stands for."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import msgspec

from spear import errors
from spear.core.config import RetrySettings, SyncExecution
from spear.core.jsonlimits import JsonRejected, encode_storable
from spear.core.state import attempts_ms
from spear.service.callerwait import MAX_WAIT_MS


def sync_wait(
    timeout: float | None,
    max_retries: int | None,
    retry: RetrySettings | None = None,
    max_wait_ms: int | None = None,
) -> float:
    """How long a SYNC caller waits for the reply: the server answers DEADLINE_EXCEEDED when its
    own wait (time limit × attempts, the backoffs between them, grace; at most its `max_wait_ms`)
    ends, so this is a little longer than that. The backoffs are the `[retry]` settings given
    (the SDK, which cannot read the server's, takes the defaults); without a time limit, the
    gateway's `max_wait_ms` given (default 300 s), which is also the least it waits when the
    retries are not given (the function may declare its own). A limit the caller gives is waited
    for in full, even past 300 s (review30: cut at 310 s, a gateway allowing 15 min was told to
    stop there)."""
    gateways_longest_s = (max_wait_ms or SyncExecution().max_wait_ms) / 1000 + 10
    if timeout is None:
        # the function's or the mode's limit: the gateway's wait ends by max_wait_ms
        return gateways_longest_s  # (probe31: 120 s ended first)
    timeout = seconds_given("timeout", timeout)
    longest_ms = attempts_ms(math.ceil(timeout * 1000), max_retries or 0, retry or RetrySettings())
    wait_s = min(longest_ms / 1000 + 10, MAX_WAIT_MS / 1000)  # (at most what Spear-Wait-Ms may say: a week)
    if max_retries is None:
        # the function's own max_retries, or the mode's, which only the gateway knows (probe33: a
        # function declaring 3 was given up on after its first attempt): its wait decides
        return max(wait_s, gateways_longest_s)
    return wait_s


def seconds_given(name: str, value: object) -> float:
    """A time in seconds a caller gives (`timeout`, `wait`): a positive finite number of at least
    a millisecond, else InvalidArgument naming it (probe33: `timeout="5"` was a bare TypeError,
    `wait=-1` an error about a header the caller never set, and 0 silently the default)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0.001:
        raise errors.InvalidArgument(f"{name} must be a number of seconds, at least 0.001, not {value!r}")
    return float(value)


def invoke_request(
    task_id: str,
    function_name: str,
    mode: str,
    params: Mapping[str, Any],
    execution_id: str | None,
    timeout: float | None,
    max_retries: int | None,
) -> dict[str, Any]:
    """An InvokeFunctionRequest; `timeout` is the time limit in seconds. Parameters are encoded
    here as the server stores values (`encode_storable`): one that JSON cannot hold as it is (NaN,
    keys `1` and `"1"` in one dict, which json.dumps merged silently: probe19) is InvalidArgument
    before anything is sent."""
    if timeout is not None:
        seconds_given("timeout", timeout)
    context: dict[str, Any] = {}
    if timeout is not None:
        context["timeout_ms"] = max(1, round(timeout * 1000))
    if max_retries is not None:
        context["max_retries"] = max_retries
    request: dict[str, Any] = {
        "task_id": task_id,
        "function_name": function_name,
        "parameters": [{"name": name, "value": _encoded(name, value)} for name, value in params.items()],
        "execution_mode": mode.upper(),
        "context": context,
    }
    if execution_id is not None:  # "" too: the server refuses it, as it refuses any bad id
        request["execution_id"] = execution_id
    return request


def _encoded(name: str, value: Any) -> msgspec.Raw:
    try:
        return msgspec.Raw(encode_storable(value))
    except JsonRejected as exc:
        raise errors.InvalidArgument(f"parameter {name!r} cannot be sent as JSON: {exc}") from None


def raise_for(reply: Mapping[str, Any]) -> None:
    """Raise the request error a reply stands for: `success: false` with an `error_code`, or
    `found: false` (the get endpoints' not-found)."""
    code = reply.get("error_code") or ""
    error: errors.SpearError | None = None
    if reply.get("success") is False and code:
        error = errors.request_error(
            str(code),
            str(reply.get("message", "")),
            execution_id=str(reply.get("execution_id", "")),
            final_status=str(reply.get("final_status", "")),
        )
    elif reply.get("found") is False:
        error = errors.NotFound(str(reply.get("message") or "not found"))
    if error is not None:
        error.reply = dict(reply)  # (`spear ... --json` prints it: the wire object)
        raise error


def outcome(execution_id: str, result: Mapping[str, Any]) -> Any:
    """The result of a COMPLETED execution, or the typed error of one that ended otherwise."""
    error = errors.outcome_error(execution_id, dict(result))
    if error is not None:
        raise error
    return result.get("result")


def parse_json(data: bytes) -> Any:
    """The JSON value in a reply, or None if it is not JSON."""
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def describe(exc: BaseException) -> str:
    """A connection failure in a few words, for the Unavailable message."""
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) or not text:
        return type(exc).__name__ if not isinstance(exc, TimeoutError) else "connection timed out"
    return text
