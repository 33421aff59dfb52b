"""The one decoding limit at the door: size, valid UTF-8 and nesting depth of a JSON document.

Pure. Every request either adapter takes is decoded through `decode_limited`, so whatever spear
stores is shallow enough to be decoded again by any reader, at any stack depth (a document
nested ~1,000 deep decodes in one place and raises RecursionError in another).
"""

from __future__ import annotations

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
        raise JsonRejected(f"malformed JSON: {exc}") from None
    if depth(data, max_depth) > max_depth:
        raise JsonRejected(f"request is nested deeper than {max_depth} levels")
    return value


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
