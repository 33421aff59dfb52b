"""The one decoding limit at the door: size, valid UTF-8 and nesting depth of a JSON document.

Pure. Every request either adapter takes is decoded through `decode_limited`, so whatever spear
stores is shallow enough to be decoded again by any reader, at any stack depth (a document
nested ~1,000 deep decodes in one place and raises RecursionError in another).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

import msgspec

MAX_DEPTH = 64  # levels of arrays/objects in one request; the stored event adds three

T = TypeVar("T")

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_INNERMOST = re.compile(rb"[\[{][\]}]")  # an array or object with nothing nested inside
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JsonRejected(ValueError):
    """The document is not one spear takes; `too_large` tells size from shape."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def decode_limited(data: bytes, kind: type[T] | Any, max_bytes: int, max_depth: int = MAX_DEPTH) -> T:
    """Decode `data` as `kind`, refusing what is too big, not UTF-8, malformed or too deep.

    msgspec's own errors (wrong types, missing fields) propagate as msgspec.ValidationError."""
    if len(data) > max_bytes:
        raise JsonRejected(f"request is {len(data)} bytes, the limit is {max_bytes}", too_large=True)
    try:
        value: T = msgspec.json.decode(data, type=kind)
    except UnicodeDecodeError:
        raise JsonRejected("request is not valid UTF-8") from None
    except RecursionError:
        raise JsonRejected(f"request is nested deeper than {max_depth} levels") from None
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as exc:
        raise JsonRejected(f"malformed JSON: {_said(exc, data)}") from None
    # Fewer opening brackets than the limit (strings' included): not too deep, no need to look.
    if data.count(b"[") + data.count(b"{") > max_depth and depth(data, max_depth) > max_depth:
        raise JsonRejected(f"request is nested deeper than {max_depth} levels")
    return value


_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _said(exc: msgspec.DecodeError, data: bytes) -> str:
    """msgspec's reason, unless it misleads: a `\\u` escape of half a UTF-16 pair (a lone
    surrogate, no character) is "Input data was truncated" to it, in a complete document."""
    if "truncated" in str(exc) and _LONE_SURROGATE.search(data):
        try:
            json.loads(data)  # the standard library takes lone surrogates: the rest is whole
        except (ValueError, RecursionError):  # (deep enough for msgspec is too deep for it: a review's 500)
            return str(exc)
        return "a \\u escape names a lone surrogate (half of a UTF-16 pair), which is no character"
    return str(exc)


def depth(data: bytes, limit: int) -> int:
    """Nesting depth of a valid JSON document, counted up to `limit + 1` (then it stops).

    Strings are blanked out, then each pass strips every innermost `[]`/`{}` pair, which lowers
    the depth by exactly one: at most `limit + 1` passes over the brackets, at C speed."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    levels = 0
    while brackets and levels <= limit:
        brackets = _INNERMOST.sub(b"", brackets)
        levels += 1
    return levels


def storable_text(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate (a file name decoded with `surrogateescape`, say),
    which no JSON event can carry, is written as its escape (`\\udcff`). What a function says
    (log lines, progress, error messages) is then always stored, whoever stores it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def bounded_text(text: str, max_chars: int) -> str:
    """`text` storable (`storable_text`) and cut to `max_chars`, the cut marked with `…`."""
    text = storable_text(text)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def exception_text(exc: BaseException) -> str:
    """`Type: message` of what a function raised, even when its `str()` raises in turn (user
    code can make it do anything): the worker that reads it must not fail on it. One with no
    message is `Type`, as its traceback's last line says (probe66: `RuntimeError:`)."""
    try:
        said = str(exc)
    except Exception as error:  # whatever it raises, the exception is still reported
        said = f"<its message cannot be read: str() raised {type(error).__name__}>"
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


def encode_storable(value: Any, max_depth: int = MAX_DEPTH) -> bytes:
    """`value` as JSON, or JsonRejected saying why it cannot be stored without losing something.

    Values JSON has no type for are written as msgspec writes them, each a documented, lossless
    spelling (docs/design.md, "Results"): tuples and sets as arrays, bytes as base64, datetimes
    as RFC 3339, UUIDs and Decimals as strings, dataclasses as objects, number keys as strings.
    What would silently change or lose the value is refused: NaN and ±Infinity (msgspec writes
    `null`), keys that become equal as strings (`{1: …, "1": …}` would store one key twice), a
    cycle (msgspec raises RecursionError), anything msgspec cannot encode, and nesting deeper
    than the door's limit. A function's result is then stored as documented, or the execution
    fails with a clear reason."""
    try:
        data = msgspec.json.encode(value)
    except RecursionError:
        raise JsonRejected("it is nested too deep, or refers to itself") from None
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise JsonRejected(exception_text(exc)) from None
    if b"null" in data and _has_non_finite(msgspec.to_builtins(value)):  # cheap test first
        raise JsonRejected("it contains NaN or Infinity, which JSON cannot hold")
    if depth(data, max_depth) > max_depth:
        raise JsonRejected(f"it is nested deeper than {max_depth} levels")
    if b"{" in data and _has_colliding_keys(value):  # no object written: no keys to collide
        raise JsonRejected("two of its keys are the same as strings (like 1 and '1'), so one would be lost")
    return data


def _has_colliding_keys(value: Any) -> bool:
    """Whether a mapping in `value` has keys that JSON writes as the same string. Only one with
    a key that is not a string can: its keys are compared as msgspec writes them."""
    stack = [msgspec.to_builtins(value)]  # dataclasses and the like as the mappings they become
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(type(key) is not str for key in item):
                written = {key if type(key) is str else msgspec.json.encode(key).decode() for key in item}
                if len(written) < len(item):
                    return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
