"""Ids in the wire contract: they become NATS subject tokens, so only [A-Za-z0-9_-], 1 to 128."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from spear.core.enums import ApiError, ErrorCode

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
ID_RULE = "1 to 128 letters, digits, '_' or '-'"  # how messages state the rule (never the regex)
# msgspec searches with Python's `re`, whose `$` also matches before a final newline: `(?!\n)`
# refuses that one (and still reads the same in the JSON Schema's ECMA dialect).
ID_REGEX = r"^[A-Za-z0-9_-]{1,128}$(?!\n)"
OPTIONAL_ID_REGEX = r"^[A-Za-z0-9_-]{0,128}$(?!\n)"
Id = Annotated[str, msgspec.Meta(pattern=ID_REGEX, description=ID_RULE)]
OptionalId = Annotated[str, msgspec.Meta(pattern=OPTIONAL_ID_REGEX, description=f"empty, or {ID_RULE}")]
# A pattern mismatch is said as the rule it stands for (see `encoding`), never as the regex.
PATTERN_RULES = {ID_REGEX: f"must be {ID_RULE}", OPTIONAL_ID_REGEX: f"must be empty or {ID_RULE}"}


def validate_id(value: Any, field: str) -> str:
    """`value` if it is a valid id, else INVALID_ARGUMENT naming `field`."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{field} must be {ID_RULE}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
