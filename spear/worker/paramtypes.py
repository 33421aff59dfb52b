"""A function's parameters taken at their annotated types: a call whose JSON does not fit them fails
`INVALID_ARGUMENT` before the function runs, instead of inside it as a FUNCTION_ERROR.

Conversion is msgspec's (`msgspec.convert`, strict: the rules of its JSON decoding), so values come
as annotated: `float` takes a JSON integer as a float and `int` a whole float (`100.0`: JSON has
one number type), a dataclass, `msgspec.Struct`, `TypedDict` or `Enum` parameter gets one built
from the JSON, `datetime`/`UUID`/`Decimal` from their strings, JSON object keys as `dict[int, …]`
says, and `Annotated[int, msgspec.Meta(ge=0)]` bounds are checked. A key that no field of a
dataclass (attrs class) or `TypedDict` value takes does not fit, at any depth (probe56: msgspec
ignores them, and a typo'd field silently took its default); a Struct keeps its own
`forbid_unknown_fields`. A parameter left unannotated,
annotated `Any` or `object`, or with a type msgspec cannot build (a class of its own, an
unresolvable string annotation) takes any JSON as before. A `None` for a parameter whose default
is `None` is taken even where the annotation does not say `| None`: `def f(x: str = None)` is a
common idiom.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from spear.core.contract.encoding import choices_at, validation_message
from spear.core.numbers import whole_floats_as_ints
from spear.worker.unknownkeys import type_parts, unknown_fields, walk_of

# What a parameter may be annotated with and still take any JSON.
_ANY = (inspect.Parameter.empty, Any, object)
_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class ParameterTypes:
    """The annotated parameters of one function as a msgspec Struct type: a call's parameters are
    converted with one `msgspec.convert`, whose error names the parameter and the place in it."""

    def __init__(self, fields: list[tuple[str, Any]]) -> None:
        # Every field may be absent (UNSET): a missing parameter is the signature's business, and
        # the function's own default applies, not a copy made here.
        self.names = frozenset(name for name, _ in fields)
        self._kinds = dict(fields)
        self._struct = msgspec.defstruct(
            "Parameters",
            [(name, typing.Union[kind, msgspec.UnsetType], msgspec.UNSET) for name, kind in fields],  # noqa: UP007 (any annotation object, `|` is not defined on all)
            forbid_unknown_fields=False,
        )
        # What to look at for keys no field takes, per parameter whose type holds a dataclass or
        # TypedDict (probe56); the others, and so most functions, are not walked at all.
        self._walks = {name: walk for name, kind in fields if (walk := walk_of(kind)) is not None}
        self.walked = frozenset(self._walks)

    @classmethod
    def of(cls, fn: Callable[..., Any], context_parameter: str | None) -> ParameterTypes | None:
        """The checkable parameters of `fn`, or None when it has none (nothing to do per call)."""
        annotated = _annotated(fn)
        try:
            hints = typing.get_type_hints(annotated, include_extras=True)
        except Exception:  # an annotation that does not resolve: resolve the others one by one
            hints = {}
        fields = []
        for parameter in inspect.signature(fn).parameters.values():
            if parameter.name == context_parameter or parameter.kind not in _BY_NAME:
                continue
            kind = hints.get(parameter.name) or _resolved(annotated, parameter.annotation)
            if kind is None or any(kind is plain for plain in _ANY) or not _buildable(kind):
                continue
            if parameter.default is None:
                kind = typing.Optional[kind]  # noqa: UP045 (as above)
            fields.append((parameter.name, kind))
        if not fields:
            return None
        try:
            return cls(fields)
        except Exception:  # types msgspec takes one by one but not together in a Struct
            return None

    def convert(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """The annotated parameters of a call at their types; ValueError says which does not fit."""
        try:
            try:
                # str_keys: a JSON object's keys are strings, `dict[int, V]` takes "1" as 1 (probe52)
                converted = msgspec.convert(parameters, self._struct, str_keys=True)
            except msgspec.ValidationError as exc:
                if "got `float`" not in str(exc):
                    raise
                # `100.0` is the JSON number 100, as a caller whose JSON writes whole doubles so
                # means it (review53): taken again with whole floats as ints, on this path only
                converted = msgspec.convert(whole_floats_as_ints(parameters), self._struct, str_keys=True)
        except msgspec.ValidationError as exc:
            raise ValueError(validation_message(exc, values_listed=self._choices(str(exc)))) from None
        except RecursionError:  # a self-referring type, nested deeper than Python's stack (review53)
            raise ValueError("nested too deep to be taken at the parameters' types") from None
        if self._walks:  # (the values fit: what each is, a union's member included, is known)
            unknown = unknown_fields(self._walks, parameters)
            if unknown:
                raise ValueError(unknown)
        return {name: value for name in self.names if (value := getattr(converted, name)) is not msgspec.UNSET}

    def _choices(self, error: str) -> str:
        """What an Enum or Literal parameter takes, for a message about a value it does not (a
        parameter's own; one deeper in a value is named by its place only)."""
        found = re.fullmatch(r"Invalid enum value .* - at `\$\.(\w+)`", error)
        kind = self._kinds.get(found.group(1)) if found else None
        return "" if kind is None else choices_at(kind, "")


def _annotated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What holds `fn`'s annotations and the names they are written in: the function a partial
    wraps, a callable object's `__call__` (probe52: `get_type_hints` of an instance reads its
    class's attributes, and a partial has no module globals)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not inspect.isroutine(fn) and not inspect.isclass(fn):
        fn = type(fn).__call__
    unwrapped: Callable[..., Any] = inspect.unwrap(fn)
    return unwrapped


def _resolved(fn: Callable[..., Any], annotation: Any) -> Any:
    """An annotation as an object: a string one (`from __future__ import annotations`) evaluated
    in the function's module as `typing.get_type_hints` does, or None when it does not resolve."""
    if not isinstance(annotation, str):
        return annotation
    namespace = getattr(fn, "__globals__", {})
    try:
        return eval(annotation, namespace)  # the user's own code, evaluated as get_type_hints does
    except Exception:
        return None


def _buildable(kind: Any) -> bool:
    """Whether msgspec can build a value of `kind` from JSON, every part of it (a class it does
    not know is one it would only pass through when it is already an instance)."""
    try:
        info = msgspec.inspect.type_info(kind)
    except Exception:  # a union msgspec refuses, a field annotation that does not resolve (probe52)
        return False
    return not any(isinstance(part, msgspec.inspect.CustomType) for part in type_parts(info))
