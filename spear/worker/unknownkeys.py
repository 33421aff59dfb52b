"""Keys no field takes, in a call's JSON for dataclass (attrs) and `TypedDict` parameters.

msgspec's conversion ignores a key that no field of a dataclass or `TypedDict` takes: a typo'd
field silently took its default (probe56). A parameter whose type holds such classes gets a walk,
worked out once from its type (`walk_of`): what to look at in the call's JSON, and where (a
union's member is chosen by the JSON's shape, a tagged Struct by its tag). The call's JSON, once
converted, is walked (`unknown_fields`) and the first object with keys no field takes is said,
with its place. Parts of a type that hold no such class are not walked; a Struct keeps its own
`forbid_unknown_fields`; `dict[str, Any]`, `Mapping`, `Any` and `object` take any keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from spear.core.contract.encoding import names_listed


def type_parts(info: msgspec.inspect.Type) -> list[msgspec.inspect.Type]:
    """`info` and every type inside it, each once (a Struct may refer to itself)."""
    seen: dict[int, msgspec.inspect.Type] = {}
    todo = [info]
    while todo:
        part = todo.pop()
        if id(part) in seen:
            continue
        seen[id(part)] = part
        for attribute in ("item_type", "key_type", "value_type", "type"):  # (`type`: Annotated's Metadata)
            inner = getattr(part, attribute, None)
            if isinstance(inner, msgspec.inspect.Type):
                todo.append(inner)
        todo.extend(getattr(part, "types", ()) or ())
        todo.extend(getattr(part, "item_types", ()) or ())  # a tuple's
        todo.extend(field.type for field in getattr(part, "fields", ()) or ())
    return list(seen.values())


_KEYED = (msgspec.inspect.DataclassType, msgspec.inspect.TypedDictType)  # (attrs classes are DataclassType)
_DICTS = tuple(kind for kind in (msgspec.inspect.DictType, getattr(msgspec.inspect, "FrozenDictType", None)) if kind)
_OBJECTS = (*_KEYED, *_DICTS, msgspec.inspect.StructType)  # what a JSON object builds
_ARRAYS = (
    msgspec.inspect.ListType,
    msgspec.inspect.SetType,
    msgspec.inspect.FrozenSetType,
    msgspec.inspect.VarTupleType,
    msgspec.inspect.TupleType,
    msgspec.inspect.NamedTupleType,
    msgspec.inspect.StructType,  # (array-like)
)

# A place in a value, said only in a message: (the place it is in, a field's ".name", an array's
# index or a 1-tuple of an object's key), or a parameter's name.
_Place = tuple[Any, str | int | tuple[str]] | str
# What is left to look at: a part of a type, the call's JSON for it, and where that is.
_Todo = list[tuple["_Walk", Any, _Place]]


class _Walk:
    """Where, in a value of one type as the call's JSON has it, a dataclass or TypedDict value may
    be: built once per parameter, each part of the type once (a dataclass may hold itself)."""

    def step(self, value: Any, place: _Place, todo: _Todo) -> str:
        """What `value` says of keys no field takes, or "" with what is in it put on `todo`."""
        return ""

    def parts(self) -> list[_Walk | None]:
        return []

    def keep(self, kept: Callable[[_Walk | None], _Walk | None]) -> None:
        """Leave out the parts that `kept` says hold no dataclass or TypedDict."""


class _Fields(_Walk):
    """A JSON object for a dataclass or TypedDict (`known`: its keys must be fields) or a Struct
    (its keys its own business); its fields' values walked."""

    def __init__(self, names: list[str] | None) -> None:
        self.known = None if names is None else frozenset(names)
        self.shown = f"fields: {names_listed(names)}" if names else "no fields"
        self.fields: list[tuple[str, str, _Walk | None]] = []  # name, place part, walk
        self.leaf = False  # keys to look at, no field to walk (a list's items are looked at in place)

    def step(self, value: Any, place: _Place, todo: _Todo) -> str:
        if not isinstance(value, dict):
            return ""
        if self.known is not None and not value.keys() <= self.known:
            unknown = [str(key) for key in value if key not in self.known]
            s = "s" if len(unknown) > 1 else ""
            return f"{_said(place)}: unknown field{s} {names_listed(unknown, quoted=True)} ({self.shown})"
        for name, part, field in reversed(self.fields):
            if field is not None and name in value:
                todo.append((field, value[name], (place, part)))
        return ""

    def parts(self) -> list[_Walk | None]:
        return [field for _, _, field in self.fields]

    def keep(self, kept: Callable[[_Walk | None], _Walk | None]) -> None:
        self.fields = [(name, part, field) for name, part, field in self.fields if kept(field) is not None]
        self.leaf = self.known is not None and not self.fields


class _Items(_Walk):
    """A JSON array (`offset` 0) or object (`offset` None), each item or value walked as `item`."""

    def __init__(self, offset: int | None) -> None:
        self.offset = offset
        self.item: _Walk | None = None

    def step(self, value: Any, place: _Place, todo: _Todo) -> str:
        item = self.item
        if item is None or not isinstance(value, list if self.offset is not None else dict):
            return ""
        pairs = enumerate(value) if isinstance(value, list) else (((key,), each) for key, each in value.items())
        if isinstance(item, _Fields) and item.leaf:  # (the usual `list[Line]`: looked at here, no todo)
            known = item.known
            assert known is not None
            for at, each in pairs:
                if isinstance(each, dict) and not each.keys() <= known:
                    return item.step(each, (place, at), todo)
            return ""
        todo.extend((item, each, (place, at)) for at, each in reversed(list(pairs)))
        return ""

    def parts(self) -> list[_Walk | None]:
        return [self.item]

    def keep(self, kept: Callable[[_Walk | None], _Walk | None]) -> None:
        self.item = kept(self.item)


class _Positions(_Walk):
    """A JSON array whose item i (after `offset`: an array-like Struct's tag) is walked as `positions[i]`."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.positions: list[_Walk | None] = []

    def step(self, value: Any, place: _Place, todo: _Todo) -> str:
        if isinstance(value, list):
            for i in reversed(range(self.offset, min(len(value), self.offset + len(self.positions)))):
                part = self.positions[i - self.offset]
                if part is not None:
                    todo.append((part, value[i], (place, i)))
        return ""

    def parts(self) -> list[_Walk | None]:
        return list(self.positions)

    def keep(self, kept: Callable[[_Walk | None], _Walk | None]) -> None:
        self.positions = [kept(part) for part in self.positions]


class _Union(_Walk):
    """A JSON object walked as the member a JSON object builds, an array as the one an array
    builds: msgspec takes one of each, or tagged Structs told apart by their tag (an object's
    `object_tag` field, an array-like Struct's first item)."""

    def __init__(self) -> None:
        self.object_tag: str | None = None
        self.arrays_tagged = False
        self.objects: dict[Any, _Walk | None] = {}
        self.arrays: dict[Any, _Walk | None] = {}

    def step(self, value: Any, place: _Place, todo: _Todo) -> str:
        if isinstance(value, dict):
            member = self.objects.get(value.get(self.object_tag) if self.object_tag is not None else None)
        elif isinstance(value, list):
            member = self.arrays.get(value[0] if self.arrays_tagged and value else None)
        else:
            member = None
        if member is not None:
            todo.append((member, value, place))
        return ""

    def parts(self) -> list[_Walk | None]:
        return [*self.objects.values(), *self.arrays.values()]

    def keep(self, kept: Callable[[_Walk | None], _Walk | None]) -> None:
        self.objects = {tag: kept(part) for tag, part in self.objects.items()}
        self.arrays = {tag: kept(part) for tag, part in self.arrays.items()}


def walk_of(kind: Any) -> _Walk | None:
    """What to walk in a value of `kind`, or None when nothing in it is a dataclass or TypedDict
    (nothing to do per call)."""
    try:
        info = msgspec.inspect.type_info(kind)
        if not any(isinstance(part, _KEYED) for part in type_parts(info)):
            return None
        walks: dict[int, _Walk] = {}
        top = _built(info, walks)
    except Exception:  # (not expected: a type msgspec took) its keys are not looked at, as before
        return None
    # Left out: every part that reaches no dataclass or TypedDict (a fixpoint: a type may hold itself)
    reaching = {id(walk) for walk in walks.values() if isinstance(walk, _Fields) and walk.known is not None}
    grown = True
    while grown:
        grown = False
        for walk in walks.values():
            if id(walk) not in reaching and any(id(part) in reaching for part in walk.parts() if part is not None):
                reaching.add(id(walk))
                grown = True

    def kept(walk: _Walk | None) -> _Walk | None:
        return walk if walk is not None and id(walk) in reaching else None

    for walk in walks.values():
        walk.keep(kept)
    return kept(top)


def _built(info: msgspec.inspect.Type, walks: dict[int, _Walk]) -> _Walk:
    """The walk of `info` and of every part of it, unpruned, each made once (by `id` of its info)."""
    while isinstance(info, msgspec.inspect.Metadata):  # Annotated[…, Meta(description=…)]
        info = info.type
    if id(info) in walks:
        return walks[id(info)]
    walk = walks[id(info)] = _made(info)
    if isinstance(walk, _Fields):
        walk.fields = [
            (field.encode_name, _part(field.encode_name), _built(field.type, walks))
            for field in info.fields  # type: ignore[attr-defined]
        ]
    elif isinstance(walk, _Positions):
        kinds = getattr(info, "item_types", None) or [field.type for field in info.fields]  # type: ignore[attr-defined]
        walk.positions = [_built(kind, walks) for kind in kinds]
    elif isinstance(walk, _Items):
        walk.item = _built(info.item_type if walk.offset is not None else info.value_type, walks)  # type: ignore[attr-defined]
    elif isinstance(walk, _Union):
        for member in info.types:  # type: ignore[attr-defined]
            while isinstance(member, msgspec.inspect.Metadata):
                member = member.type
            tag_field = member.tag_field if isinstance(member, msgspec.inspect.StructType) else None
            tagged = tag_field is not None
            tag = getattr(member, "tag", None) if tagged else None
            if isinstance(member, _OBJECTS) and not getattr(member, "array_like", False):
                walk.objects[tag] = _built(member, walks)
                walk.object_tag = tag_field or walk.object_tag
            elif isinstance(member, _ARRAYS):
                walk.arrays[tag] = _built(member, walks)
                walk.arrays_tagged = walk.arrays_tagged or tagged
    return walk


def _made(info: msgspec.inspect.Type) -> _Walk:
    """The walk of `info` itself, its parts still to build."""
    i = msgspec.inspect
    if isinstance(info, _KEYED):
        names = [field.encode_name for field in info.fields]
        declared = {name: n for n, name in enumerate(getattr(info.cls, "__annotations__", {}))}
        if isinstance(info, i.TypedDictType) and all(name in declared for name in names):
            names.sort(key=declared.__getitem__)  # (msgspec lists a TypedDict's keys sorted)
        return _Fields(names)
    if isinstance(info, i.StructType):  # its keys its own business (`forbid_unknown_fields`), its fields walked
        return _Positions(1 if info.tag_field is not None else 0) if info.array_like else _Fields(None)
    if isinstance(info, i.NamedTupleType | i.TupleType):
        return _Positions(0)
    if isinstance(info, i.ListType | i.SetType | i.FrozenSetType | i.VarTupleType):
        return _Items(0)
    if isinstance(info, _DICTS):
        return _Items(None)
    if isinstance(info, i.UnionType):
        return _Union()
    return _Walk()  # a scalar, Any, an Enum…: nothing inside


def unknown_fields(walks: Mapping[str, _Walk], parameters: Mapping[str, Any]) -> str:
    """What the first object (parameters in the signature's order, each value in its own) with
    keys its dataclass or TypedDict does not take says, or "". The values are the call's JSON,
    known to fit their types (converted): a union's member is told by what the JSON is."""
    todo: _Todo = [(walk, parameters[name], name) for name, walk in reversed(list(walks.items())) if name in parameters]
    while todo:
        walk, value, place = todo.pop()
        said = walk.step(value, place, todo)
        if said:
            return said
    return ""


def _said(place: _Place) -> str:
    """A place as messages say it: `order.lines[0]`, `prices['eu']`."""
    parts = []
    while isinstance(place, tuple):
        place, part = place
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif isinstance(part, tuple):
            parts.append(f"[{names_listed([str(part[0])], quoted=True)}]")
        else:
            parts.append(part)
    return place + "".join(reversed(parts))


def _part(name: str) -> str:
    """A field's part of a place: `.qty`, or `['odd name']`."""
    return f".{name}" if name.isidentifier() else f"[{names_listed([name], quoted=True)}]"
