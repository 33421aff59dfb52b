"""JSON has one number type: `1`, `1.0` and `1e0` are one value, which Python decodes as an int or a
float depending on how it was written. Where spear compares requests (idempotency) or takes a
value as an `int` (a function's annotated parameter), a whole float is that integer: Python's
`json.dumps`, Jackson and .NET write whole doubles as `100.0` (probe50, review53)."""

from __future__ import annotations

from typing import Any

import msgspec

MAX_EXACT = 2**53  # whole floats past this are left floats: a double holds no exact integer there


def _whole_as_int(text: str) -> int | float:
    number = float(text)
    return int(number) if number.is_integer() and abs(number) <= MAX_EXACT else number


_whole_floats_decoder = msgspec.json.Decoder(float_hook=_whole_as_int)


def canonical_json(value: Any) -> bytes:
    """`value` as JSON with sorted keys and every whole number written as an integer."""
    encoded = msgspec.json.encode(value, order="sorted")
    # msgspec writes a whole float under 1e16 as `100.0` (and MAX_EXACT is under 1e16): without
    # ".0" there is none, the common case, and nothing is decoded again
    if b".0" not in encoded:
        return encoded
    return msgspec.json.encode(_whole_floats_decoder.decode(encoded), order="sorted")


def whole_floats_as_ints(value: Any) -> Any:
    """`value` (JSON-like) with every whole float an int."""
    return _whole_floats_decoder.decode(msgspec.json.encode(value))
