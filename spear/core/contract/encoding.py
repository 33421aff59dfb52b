"""Decoding requests with clear errors (ApiError with the contract's codes), and encoding replies."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from spear.core.contract.identifiers import PATTERN_RULES
from spear.core.enums import ApiError, ErrorCode
from spear.core.jsonlimits import JsonRejected, decode_limited

T = TypeVar("T")


def decode_request(data: bytes, kind: type[T], max_bytes: int) -> T:
    """Decode a request body into `kind`, mapping every failure to a clear ApiError. The limits
    (size, UTF-8, nesting depth) are those of `jsonlimits`, so what is stored can be read back."""
    if len(data) <= max_bytes and not data.strip():
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "request body is empty: a JSON object is required")
    try:
        return decode_limited(data, kind, max_bytes)
    except JsonRejected as exc:
        raise ApiError(ErrorCode.PAYLOAD_TOO_LARGE if exc.too_large else ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    except msgspec.ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, _validation_message(exc)) from None


def decode_json_object(data: bytes, max_bytes: int) -> dict[str, Any]:
    """A JSON object under the same limits (for adapters that add fields before decoding)."""
    return decode_request(data, dict[str, Any], max_bytes)


def _validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with a pattern mismatch said as the rule it stands for."""
    text = str(exc)
    found = re.fullmatch(r"Expected `str` matching regex '(.*)' - at `\$\.(.*)`", text)
    pattern = found.group(1).replace("\\\\", "\\") if found else ""  # msgspec shows `\` doubled
    if found and pattern in PATTERN_RULES:
        return f"{found.group(2)} {PATTERN_RULES[pattern]}"
    return f"invalid request: {text}"


def encode(message: msgspec.Struct) -> bytes:
    """A reply as JSON."""
    return _encoder.encode(message)


_encoder = msgspec.json.Encoder()
