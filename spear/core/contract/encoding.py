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
    except msgspec.ValidationError:
        return _decode_as_proto3_json(data, kind, max_bytes)


def _decode_as_proto3_json(data: bytes, kind: type[T], max_bytes: int) -> T:
    """What protobuf's JSON mapping allows and a strict decoding refuses: `null` for a field (its
    default, as if absent) and numbers as strings (`"timeout_ms": "5000"`, how protojson writes
    64-bit integers). Tried only once the strict decoding failed: a valid request pays nothing.
    A parameter's `value` is the caller's own JSON and is left as it is."""
    try:
        value = _without_nulls(decode_limited(data, Any, max_bytes))
        decoded = msgspec.convert(value, kind, strict=False)
    except JsonRejected as exc:  # (not reached: the strict decoding found it first)
        raise ApiError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
    except msgspec.ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, validation_message(exc, kind=kind)) from None
    _refuse_bools_not_sent_as_such(decoded, value, "")
    return decoded


def _refuse_bools_not_sent_as_such(decoded: Any, sent: Any, path: str) -> None:
    """The lax decoding reads `"false"`, `"true"`, `0` and `1` as booleans; protojson does not,
    and a `"force": "false"` read as false is a guess (probe35: `"force": "true"` deleted a task).
    Every boolean field must have been sent as `true` or `false`."""
    if isinstance(decoded, msgspec.Struct) and isinstance(sent, dict):
        for field, name in zip(decoded.__struct_fields__, decoded.__struct_encode_fields__, strict=True):
            value, given = getattr(decoded, field), sent.get(name)
            where = f"{path}.{name}" if path else name
            if isinstance(value, bool) and given is not None and not isinstance(given, bool):
                got = "a string" if isinstance(given, str) else "a number"
                raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{where}: expected true or false, got {got}")
            _refuse_bools_not_sent_as_such(value, given, where)
    elif isinstance(decoded, list) and isinstance(sent, list):
        for i, (item, given) in enumerate(zip(decoded, sent, strict=False)):
            _refuse_bools_not_sent_as_such(item, given, f"{path}[{i}]")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v if k == "value" else _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def decode_json_object(data: bytes, max_bytes: int) -> dict[str, Any]:
    """A JSON object under the same limits (for adapters that add fields before decoding)."""
    return decode_request(data, dict[str, Any], max_bytes)


def validation_message(
    exc: msgspec.ValidationError, values_listed: str = " (the OpenAPI document lists them)", kind: Any = None
) -> str:
    """msgspec's message said in the contract's words (a request's, or a call's parameters'): a
    pattern mismatch as the rule it stands for, a wrong type or bound as `field: expected an
    integer >= 1, got a string`, a value an enum does not take with those it takes (read from
    `kind`, the type decoded, where given)."""
    # a dict's key: "… - at `key` in `$.d`" said as "d (a key)" (probe52: `dict[int, str]`)
    text = re.sub(r" - at `key` in `\$(.*)`$", r" - at `$\1 (a key)`", str(exc))
    found = re.fullmatch(r"Expected `str` matching regex '(.*)' - at `\$\.(.*)`", text)
    pattern = found.group(1).replace("\\\\", "\\") if found else ""  # msgspec shows `\` doubled
    if found and pattern in PATTERN_RULES:
        return f"{found.group(2)} {PATTERN_RULES[pattern]}"
    typed = re.fullmatch(r"Expected `([^`]+)`(.*?)(?:, got `([^`]+)`)? - at `\$\.?(.*)`", text)
    if typed:
        kind, bound, got, path = typed.groups()
        kinds = " or ".join(_TYPE_NAMES.get(part, part) for part in kind.split(" | "))  # `int | null`
        expected = f"expected {kinds}{bound.replace('`', '')}"
        return f"{path or 'request'}: {expected}" + (f", got {_TYPE_NAMES.get(got, got)}" if got else "")
    enum = re.fullmatch(r"Invalid enum value (.+) - at `\$\.?(.*)`", text)
    if enum:
        field = enum.group(2) or "request"
        listed = choices_at(kind, enum.group(2)) if kind is not None else ""
        return f"{field}: {enum.group(1)} is not one of the values it takes{listed or values_listed}"
    unknown = re.fullmatch(r"Object contains unknown field `([^`]+)`(?: - at `\$\.?(.*)`)?", text)
    if unknown:
        return f"unknown field {unknown.group(1)!r}" + (f" in {unknown.group(2)}" if unknown.group(2) else "")
    missing = re.fullmatch(r"Object missing required field `([^`]+)`(?: - at `\$\.?(.*)`)?", text)
    if missing:
        return f"missing required field {missing.group(1)!r}" + (f" in {missing.group(2)}" if missing.group(2) else "")
    placed = re.fullmatch(r"(.+) - at `\$\.?(.*)`", text)  # e.g. "Invalid RFC3339 encoded datetime"
    if placed:
        return f"{placed.group(2) or 'request'}: {placed.group(1)[:1].lower()}{placed.group(1)[1:]}"
    return f"invalid request: {text}"


def names_listed(names: list[str], most: int = 10, quoted: bool = False) -> str:
    """Names a caller gave, for a message: an identifier as it is (unless `quoted`), any other
    quoted and cut short (review53: a name is any text, newlines and commas too), at most `most`
    of them."""
    shown = [
        name
        if name.isidentifier() and len(name) <= 40 and not quoted
        else repr(name if len(name) <= 40 else name[:40] + "…")
        for name in names
    ]
    more = len(shown) - most
    return ", ".join(shown[:most]) + (f" and {more} more" if more > 0 else "")


_TYPE_NAMES = {
    "int": "an integer",
    "str": "a string",
    "bool": "true or false",
    "float": "a number",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def encode(message: msgspec.Struct) -> bytes:
    """A reply as JSON."""
    return _encoder.encode(message)


_encoder = msgspec.json.Encoder()


def choices_at(kind: Any, path: str) -> str:
    """`: 'a', 'b'`, the values of the Enum or Literal at `path` (`a.b[0].c`) in `kind`; "" if
    there is none there (probe56: "artifact_type: 'docker' is not one of the values it takes",
    which it did not name)."""
    info: Any = msgspec.inspect.type_info(kind)
    for step in re.findall(r"\[\d+\]|[^.\[\]]+", path):
        info = _inside(info, step)
        if info is None:
            return ""
    values: list[Any] = []
    for part in _members(info):
        if isinstance(part, msgspec.inspect.EnumType):
            values.extend(member.value for member in part.cls)
        elif isinstance(part, msgspec.inspect.LiteralType):
            values.extend(part.values)
    shown = ", ".join(repr(value) for value in values[:20]) + (", …" if len(values) > 20 else "")
    return f": {shown}" if values else ""


def _members(info: Any) -> tuple[Any, ...]:
    """A union's member types (Optional[...] included), else the type itself."""
    return tuple(getattr(info, "types", None) or (info,))


def _inside(info: Any, step: str) -> Any:
    """The type at one step of a path: a struct's field (`name`) or a sequence's item (`[0]`)."""
    for part in _members(info):
        if step.startswith("[") and isinstance(part, (msgspec.inspect.ListType, msgspec.inspect.SetType)):
            return part.item_type
        if isinstance(part, msgspec.inspect.StructType):
            for field in part.fields:
                if field.encode_name == step:
                    return field.type
        if isinstance(part, msgspec.inspect.DictType) and not step.startswith("["):
            return part.value_type
    return None
