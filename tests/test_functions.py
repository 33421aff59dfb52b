"""Users' own functions: the task SDK, parameters checked at the door, per-function defaults and
the function Context, against a real server (CONTRACT §8)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import sys
import time
from collections.abc import Mapping
from typing import Annotated, Any, TypedDict

import aiohttp
import attrs
import msgspec
import pytest

import spear
from spear.cli import output
from spear.core.enums import ErrorCode, ExecutionStatus
from spear.worker import attempt as attempt_module
from spear.worker import context as context_module
from tests.conftest import call_body, has_status
from tests.own_tasks import own

# --- the SDK ---------------------------------------------------------------------------------------


def test_ids_are_checked_when_the_task_is_built():
    with pytest.raises(spear.TaskDefinitionError, match=r"task_id must be 1 to 128 characters.*'shop\.eu'"):
        spear.Task("shop.eu")
    task = spear.Task("shop")
    with pytest.raises(spear.TaskDefinitionError, match="function name must be"):
        task.function(name="ship it")(lambda: None)
    with pytest.raises(spear.TaskDefinitionError, match="positional-only"):

        @task.function
        def positional(a, /):
            return a

    with pytest.raises(spear.TaskDefinitionError, match="'a' and 'b' both take the Context"):  # (probe29)

        @task.function
        def two_contexts(a: spear.Context, b: spear.Context) -> None:
            return None

    with pytest.raises(spear.TaskDefinitionError, match="isolation='process' runs plain functions"):

        @task.function(isolation="process")
        async def not_killable():
            return None

    with pytest.raises(spear.TaskDefinitionError, match="defined twice"):
        task.function(name="twice")(lambda: 1)
        task.function(name="twice")(lambda: 2)


def test_the_published_description_says_parameters_defaults_and_kinds():
    info = {f.name: f for f in own.info().functions}
    assert [(p.name, p.required) for p in info["add"].parameters] == [("a", True), ("b", False)]
    assert info["add"].description == "a + b." and not info["add"].accepts_any
    assert info["anything"].accepts_any and [p.name for p in info["anything"].parameters] == ["first"]
    assert (info["slow"].timeout_ms, info["slow"].max_retries) == (300, 2)
    assert [p.name for p in info["about"].parameters] == ["note"]  # the context is no parameter
    assert own.info().artifact_spec == {"artifact_type": "python", "location": "tests.own_tasks"}


def test_the_public_face_is_exported():
    assert set(spear.__all__) >= {"Task", "Context", "NonRetryableError", "InvalidArgument", "ExecutionCancelled"}


# --- parameters at the door ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"b": 1}, "add(a, b=…): missing required parameter a"),
        ({"a": 1, "c": 2}, "add(a, b=…): unknown parameter c"),
        ({"c": 2, "ctx": 3}, "missing required parameter a; unknown parameters c, ctx"),
    ],
)
async def test_missing_or_unknown_parameters_are_refused_before_anything_is_stored(served, client, parameters, message):
    body = {**call_body("add", **parameters), "execution_id": "refused-at-the-door"}
    reply, headers = await served.call(client, "invoke_function", body)
    assert reply == {"success": False, "error_code": "INVALID_ARGUMENT", "message": reply["message"]}
    assert message in reply["message"] and headers["Nats-Service-Error-Code"] == "400"
    async with aiohttp.ClientSession() as http, http.post(f"{served.http}/api/v1/invoke", json=body) as response:
        assert response.status == 400
        assert message in (await response.json())["message"]
    assert await served.service.store.history("refused-at-the-door") == []  # nothing written


async def test_a_function_taking_kwargs_takes_any_parameter(served, client):
    reply, _ = await served.call(client, "invoke_function", call_body("anything", first="a", second=2))
    assert reply["result"]["result"] == {"first": "a", "second": 2}
    reply, _ = await served.call(client, "invoke_function", call_body("anything", second=2))
    assert reply["error_code"] == "INVALID_ARGUMENT", reply
    # the function's own name for its `**` parameter (probe66: `**rest` was said `**kwargs`)
    assert "anything(first, **rest): missing required parameter first" in reply["message"], reply
    assert output.parameters(msgspec.to_builtins(own.functions["anything"].info())) == "first: str, **rest"


def test_unknown_names_are_quoted_cut_short_and_counted_in_the_message():
    """review53: any text is a name now: `x, b\nmissing required parameter c` read as two problems."""
    from spear.core.contract import FunctionInfo, ParameterInfo
    from spear.core.enums import ApiError
    from spear.service.registry import check_parameters

    add = FunctionInfo(name="add", parameters=[ParameterInfo(name="a"), ParameterInfo(name="b", required=False)])
    with pytest.raises(ApiError) as refused:
        check_parameters(add, ["a", "x, b\nmissing required parameter c", "y" * 300, *[f"n{i}" for i in range(12)]])
    expected = "add(a, b=…): unknown parameters 'x, b\\nmissing required parameter c', '" + "y" * 40 + "…', n0, "
    assert refused.value.message.startswith(expected) and refused.value.message.endswith("n7 and 4 more"), refused.value


async def test_a_parameter_name_is_any_string_a_function_takes(served, client):
    """probe50: `user-id` was refused as no identifier, even for a function that takes any name."""
    body = {
        **call_body("anything", first="a"),
        "parameters": [{"name": "first", "value": "a"}, {"name": "user-id", "value": 7}],
    }
    reply, _ = await served.call(client, "invoke_function", body)
    assert reply["result"]["result"] == {"first": "a", "user-id": 7}, reply
    for name, message in (
        ("user-id", "unknown parameter 'user-id'"),
        ("", "parameter name '' must be 1 to 256 characters"),
    ):
        body = {**call_body("add", a=1), "execution_id": "odd-name"}
        body["parameters"].append({"name": name, "value": 1})
        reply, _ = await served.call(client, "invoke_function", body)
        assert reply["error_code"] == "INVALID_ARGUMENT" and message in reply["message"], reply
        assert await served.service.store.history("odd-name") == []


async def test_a_function_taking_kwargs_and_its_context_refuses_the_contexts_name_at_the_door(served, client):
    """probe19: `ctx` passed to `(ctx, **rest)` was stored, then failed INVALID_ARGUMENT in the worker."""
    reply, _ = await served.call(client, "invoke_function", call_body("anything_with_context", x=1))
    assert reply["result"]["result"] == {"attempt": 1, "x": 1}, reply
    body = {**call_body("anything_with_context", ctx=1), "execution_id": "names-the-context"}
    reply, headers = await served.call(client, "invoke_function", body)
    assert reply["error_code"] == "INVALID_ARGUMENT" and headers["Nats-Service-Error-Code"] == "400", reply
    assert "parameter name 'ctx' is reserved for the context" in reply["message"], reply
    assert await served.service.store.history("names-the-context") == []  # nothing written


# --- parameters at their annotated types ---------------------------------------------------------


async def test_parameters_are_taken_at_their_annotated_types(served, client):
    lines = [{"sku": "a", "qty": 2}, {"sku": "b"}]
    body = call_body("order", lines=lines, speed="fast", when="2026-12-02T10:00:00Z")
    reply, _ = await served.call(client, "invoke_function", body)
    assert reply["result"]["status"] == "EXECUTION_STATUS_COMPLETED", reply
    expected = {"lines": ["Line", "Line"], "items": 3, "speed": "FAST", "when": 2026, "note": None}
    assert reply["result"]["result"] == expected
    # `note: str = None` takes the None its default is; an int given to a float is a float
    reply, _ = await served.call(client, "invoke_function", call_body("order", lines=[], note=None))
    assert reply["result"]["result"] == {"lines": [], "items": 0, "speed": "SLOW", "when": None, "note": None}
    reply, _ = await served.call(client, "invoke_function", call_body("halve", n=3))
    assert reply["result"]["result"] == 1.5, reply
    # a whole float is that integer, as JSON writers that write whole doubles `100.0` mean it (review53)
    reply, _ = await served.call(client, "invoke_function", call_body("add", a=100.0, b=2))
    assert reply["result"]["result"] == 102 and isinstance(reply["result"]["result"], int), reply
    reply, _ = await served.call(client, "invoke_function", call_body("add", a=100.5))
    assert "a: expected an integer, got a number" in reply["result"]["error_message"], reply


@pytest.mark.parametrize(
    ("function", "parameters", "message"),
    [
        ("order", {"lines": [{"sku": "a", "qty": 0}]}, "lines[0].qty: expected an integer >= 1"),
        ("order", {"lines": [{"qty": 2}]}, "missing required field 'sku' in lines[0]"),
        ("order", {"lines": [{"sku": "a", "qyt": 2}]}, "lines[0]: unknown field 'qyt' (fields: sku, qty)"),  # (probe56)
        ("order", {"lines": [], "speed": "warp"}, "speed: 'warp' is not one of the values it takes: 'slow', 'fast'"),
        ("order", {"lines": [], "when": "yesterday"}, "when: invalid RFC3339 encoded datetime"),
        ("order", {"lines": {"sku": "a"}}, "lines: expected an array, got an object"),
        ("add", {"a": "1"}, "a: expected an integer, got a string"),
        ("add", {"a": True}, "a: expected an integer, got true or false"),
        ("halve", {"n": "4"}, "n: expected a number, got a string"),  # inline: the worker's quick path
    ],
)
async def test_parameters_that_do_not_fit_their_annotations_fail_invalid_argument_at_once(
    served, client, function, parameters, message
):
    """probe47: `add(a="1")` ran and failed FUNCTION_ERROR (a TypeError inside the function),
    retried as such; a dataclass parameter came as a dict."""
    reply, _ = await served.call(client, "invoke_function", call_body(function, **parameters))
    result = reply["result"]
    assert result["status"] == "EXECUTION_STATUS_FAILED" and result["error_code"] == "INVALID_ARGUMENT", reply
    # the call's form by names, then the place: no default's value (probe52: a secret, or 64 KiB)
    forms = {"order": "order(lines, speed=…, when=…, note=…)", "add": "add(a, b=…)", "halve": "halve(n)"}
    assert result["error_message"].startswith(f"parameters do not fit {forms[function]}: {message}"), result
    assert result["attempt"] == 1  # not retried (`order` has max_retries=2)
    kinds = [stored.event.kind for stored in await served.service.store.history(reply["execution_id"])]
    assert "retrying" not in kinds and kinds[-1] == "failed", kinds


@dataclasses.dataclass
class _Money:
    amount: NotImportedHere  # type: ignore[name-defined]  # noqa: F821 (imported under TYPE_CHECKING only, say)
    currency: str = "EUR"


@dataclasses.dataclass
class _Point:
    x: int
    y: int = 0


class _Scaler:
    factor: float = 2.0  # a class attribute: not what its calls take

    def __call__(self, factor: str, n: int) -> str:
        return factor * n


def _with_point(a: int, p: _Point, keys: dict[int, str] | None = None) -> None:
    return None


def test_how_a_function_is_wrapped_or_what_its_classes_name_never_fails_its_calls():
    """probe52: a dataclass whose field named a type imported only for type checkers failed every
    call FUNCTION_ERROR (NameError), retried; a callable object was checked against its class's
    attributes; a partial of a function in a module of string annotations was not checked."""
    from spear.worker.paramtypes import ParameterTypes

    def pay(m: _Money, n: int) -> None:
        return None

    pay_types = ParameterTypes.of(pay, None)
    assert pay_types is not None and pay_types.names == {"n"}  # `m` takes any JSON, as before
    scaler = ParameterTypes.of(_Scaler(), None)
    assert scaler is not None and scaler.convert({"factor": "x", "n": 2}) == {"factor": "x", "n": 2}
    partial = ParameterTypes.of(functools.partial(_with_point, 1), None)
    assert partial is not None and partial.convert({"p": {"x": 1}, "keys": {"1": "a"}}) == {
        "p": _Point(1),
        "keys": {1: "a"},  # a JSON object's keys are strings: "1" is the int key 1
    }
    with pytest.raises(ValueError, match=r"^keys \(a key\): expected an integer, got a string$"):
        partial.convert({"p": {"x": 1}, "keys": {"one": "a"}})


class _Nested(msgspec.Struct):
    inner: _Nested | None = None


def test_values_nested_deeper_than_the_stack_are_invalid_arguments_not_function_errors():
    from spear.worker.paramtypes import ParameterTypes

    def deep(tree: _Nested) -> None:
        return None

    value: dict[str, Any] = {}
    for _ in range(sys.getrecursionlimit() + 100):
        value = {"inner": value}
    types = ParameterTypes.of(deep, None)
    assert types is not None
    with pytest.raises(ValueError, match="nested too deep"):
        types.convert({"tree": value})


def test_only_annotations_msgspec_can_build_are_checked():
    from spear.worker.paramtypes import ParameterTypes

    class Own:  # a class of the user's own: passed through as before
        pass

    def f(a, b: Any, c: object, d: Own, e: Undefined, f: list[int] | tuple[int, ...], g: int = None, ctx=None):  # noqa: F821, RUF013
        return None

    assert ParameterTypes.of(f, "ctx").names == {"g"}  # type: ignore[union-attr]
    assert ParameterTypes.of(lambda a, b: None, None) is None  # nothing to do per call
    types = ParameterTypes.of(f, "ctx")
    assert types is not None and types.convert({"a": "x", "g": None, "zz": 1}) == {"g": None}
    with pytest.raises(ValueError, match="g: expected an integer or null, got a string"):
        types.convert({"g": "1"})


class _Own:  # a class of the user's own, msgspec does not build it
    pass


def test_classes_msgspec_cannot_build_inside_a_tuple_or_annotated_leave_their_parameter_unchecked():
    """A class of the user's own in `tuple[Own, int]` or `Annotated[Own, …]` was taken as one msgspec
    builds: every call failed (`t[0]: expected Own`), where such a parameter takes any JSON."""
    from spear.worker.paramtypes import ParameterTypes

    def f(t: tuple[_Own, int], u: Annotated[_Own, msgspec.Meta(description="own")], n: int = 0) -> None:
        return None

    types = ParameterTypes.of(f, None)
    assert types is not None and types.names == {"n"}


@dataclasses.dataclass
class _Item:
    sku: str
    qty: int = 1


@dataclasses.dataclass
class _Order:
    customer: str
    lines: list[_Item]
    gift: _Item | None = None
    by_store: dict[str, list[_Item]] = dataclasses.field(default_factory=dict)
    pair: tuple[_Item, int] | None = None


@dataclasses.dataclass
class _Opts:
    verbose: bool = False


class _Address(TypedDict, total=False):
    street: str
    city: str


class _Tagged(msgspec.Struct, tag=True):
    item: _Item | None = None


class _Other(msgspec.Struct, tag=True):
    opts: _Opts | None = None


class _Lax(msgspec.Struct):  # a Struct says itself what it does with keys it does not have
    opts: _Opts | None = None


class _Row(msgspec.Struct, array_like=True, tag=True):  # a JSON array ["_Row", {…}]
    opts: _Opts


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    n: int = 0


@dataclasses.dataclass
class _Tree:
    label: str
    kids: list[_Tree] = dataclasses.field(default_factory=list)


def _typed(
    order: _Order,
    opts: _Opts = None,  # type: ignore[assignment]  # (the None-default idiom)
    address: _Address | None = None,
    many: list[_Opts] | _Opts | None = None,
    either: _Tagged | _Other | None = None,
    lax: _Lax | None = None,
    strict: _Strict | None = None,
    tree: _Tree | None = None,
    free: dict[str, Any] | None = None,
    mapping: Mapping[str, _Opts] | None = None,
    row_or_map: _Row | dict[str, _Opts] | None = None,
) -> None:
    return None


_ORDER = {"customer": "bob", "lines": [{"sku": "a", "qty": 2}]}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"order": {**_ORDER, "lines": [{"sku": "a", "qyt": 2}]}},
            "order.lines[0]: unknown field 'qyt' (fields: sku, qty)",
        ),
        ({"order": _ORDER, "opts": {"verbsoe": True}}, "opts: unknown field 'verbsoe' (fields: verbose)"),
        ({"order": {**_ORDER, "gift": {"sku": "g", "q": 1}}}, "order.gift: unknown field 'q' (fields: sku, qty)"),
        (
            {"order": {**_ORDER, "by_store": {"eu": [{"sku": "a"}, {"sku": "b", "n": 1}]}}},
            "order.by_store['eu'][1]: unknown field 'n'",
        ),
        ({"order": {**_ORDER, "pair": [{"sku": "a", "x": 1}, 2]}}, "order.pair[0]: unknown field 'x'"),
        (
            {"order": {**_ORDER, "customr": "bob"}},
            "order: unknown field 'customr' (fields: customer, lines, gift, by_store, pair)",
        ),
        (
            {"order": _ORDER, "address": {"street": "x", "zip": "1"}},
            "address: unknown field 'zip' (fields: street, city)",
        ),
        (
            {"order": _ORDER, "many": [{}, {"verbos": 1, "x": 2}]},
            "many[1]: unknown fields 'verbos', 'x' (fields: verbose)",
        ),
        ({"order": _ORDER, "many": {"verbos": True}}, "many: unknown field 'verbos'"),
        (
            {"order": _ORDER, "either": {"type": "_Tagged", "item": {"sku": "a", "y": 1}}},
            "either.item: unknown field 'y'",
        ),
        ({"order": _ORDER, "either": {"type": "_Other", "opts": {"y": 1}}}, "either.opts: unknown field 'y'"),
        ({"order": _ORDER, "lax": {"zz": 1, "opts": {"loud": True}}}, "lax.opts: unknown field 'loud'"),
        (
            {"order": _ORDER, "tree": {"label": "a", "kids": [{"label": "b", "kids": [{"label": "c", "lable": 1}]}]}},
            "tree.kids[0].kids[0]: unknown field 'lable'",
        ),
        ({"order": _ORDER, "mapping": {"k": {"verbose": True}, "j": {"v": 1}}}, "mapping['j']: unknown field 'v'"),
        ({"order": _ORDER, "row_or_map": ["_Row", {"v": 1}]}, "row_or_map[1]: unknown field 'v'"),
        ({"order": _ORDER, "row_or_map": {"k": {"v": 1}}}, "row_or_map['k']: unknown field 'v'"),
    ],
)
def test_unknown_fields_inside_dataclass_and_typeddict_values_do_not_fit(parameters, message):
    """probe56: a typo'd field of a dataclass (or TypedDict) parameter was dropped without a word
    and the field took its default (`qyt` for `qty`: a quantity of 1); at the top level an
    unknown name is refused, deeper it must be too."""
    from spear.worker.paramtypes import ParameterTypes

    types = ParameterTypes.of(_typed, None)
    assert types is not None
    with pytest.raises(ValueError) as refused:
        types.convert(parameters)
    assert str(refused.value).startswith(message), str(refused.value)


def test_values_with_known_fields_only_still_fit_unions_and_free_mappings_included():
    from spear.worker.paramtypes import ParameterTypes

    types = ParameterTypes.of(_typed, None)
    assert types is not None
    order = {**_ORDER, "gift": None, "by_store": {"eu": [{"sku": "b"}]}, "pair": [{"sku": "c", "qty": 3}, 1]}
    converted = types.convert(
        {
            "order": order,
            "opts": None,
            "address": {"city": "x"},
            "many": [{"verbose": True}, {}],
            "either": {"type": "_Other", "opts": {"verbose": True}},
            "lax": {"anything": 1, "opts": {}},  # a Struct's own choice: unknown keys ignored
            "tree": {"label": "a", "kids": [{"label": "b"}]},
            "free": {"any": {"keys": [1]}, "at": "all"},
            "mapping": {"k": {"verbose": False}},
            "row_or_map": ["_Row", {"verbose": True}],
        }
    )
    assert converted["order"] == _Order("bob", [_Item("a", 2)], None, {"eu": [_Item("b")]}, (_Item("c", 3), 1))
    assert converted["many"] == [_Opts(True), _Opts()] and converted["address"] == {"city": "x"}
    assert converted["either"] == _Other(_Opts(True)) and converted["tree"] == _Tree("a", [_Tree("b")])
    assert converted["free"] == {"any": {"keys": [1]}, "at": "all"}
    assert converted["row_or_map"] == _Row(_Opts(True))
    assert types.convert({"order": _ORDER, "row_or_map": {"k": {}}})["row_or_map"] == {"k": _Opts()}
    assert types.convert({"order": _ORDER, "many": {"verbose": True}})["many"] == _Opts(True)
    with pytest.raises(ValueError, match="unknown field 'zz' in strict"):  # the Struct's own refusal, as before
        types.convert({"order": _ORDER, "strict": {"zz": 1}})


def test_unknown_field_names_are_quoted_cut_and_counted():
    """As the gateway's message for unknown parameters: a name is any text (review53)."""
    from spear.worker.paramtypes import ParameterTypes

    types = ParameterTypes.of(_typed, None)
    assert types is not None
    long = "x" * 100
    with pytest.raises(ValueError) as refused:
        types.convert({"order": _ORDER, "opts": {long: 1, "a\nb, c": 2, **{f"k{i}": i for i in range(12)}}})
    message = str(refused.value)
    shown = ", ".join([repr("x" * 40 + "…"), repr("a\nb, c")] + [repr(f"k{i}") for i in range(8)])
    assert message == f"opts: unknown fields {shown} and 4 more (fields: verbose)", message


@attrs.define
class _Account:
    owner: str
    opts: Annotated[_Opts, msgspec.Meta(description="how")] = attrs.Factory(_Opts)


def test_attrs_classes_and_annotated_or_tuple_held_dataclasses_refuse_unknown_fields_too():
    from spear.worker.paramtypes import ParameterTypes

    def f(
        account: _Account | None = None, pair: tuple[int, Annotated[_Opts, msgspec.Meta(title="o")]] = (0, _Opts())
    ) -> None:
        return None

    types = ParameterTypes.of(f, None)
    assert types is not None and types.walked == {"account", "pair"}
    assert types.convert({"account": {"owner": "a", "opts": {"verbose": True}}}) == {
        "account": _Account("a", _Opts(True))
    }
    with pytest.raises(ValueError, match=r"^account: unknown field 'ownr' \(fields: owner, opts\)$"):
        types.convert({"account": {"owner": "a", "ownr": "b"}})
    with pytest.raises(ValueError, match=r"^account.opts: unknown field 'v' \(fields: verbose\)$"):
        types.convert({"account": {"owner": "a", "opts": {"v": True}}})
    with pytest.raises(ValueError, match=r"^pair\[1\]: unknown field 'v' \(fields: verbose\)$"):
        types.convert({"pair": [1, {"v": True}]})


def test_only_functions_with_dataclass_or_typeddict_values_walk_them():
    from spear.worker.paramtypes import ParameterTypes

    def plain(a: int, b: list[str], c: dict[str, Any], s: _Strict, lax: _Lax | None = None) -> None:
        return None

    plain_types = ParameterTypes.of(plain, None)
    assert plain_types is not None and plain_types.walked == {"lax"}  # `_Lax` holds a dataclass
    typed = ParameterTypes.of(_typed, None)
    assert typed is not None
    assert typed.walked == {"order", "opts", "address", "many", "either", "lax", "tree", "mapping", "row_or_map"}


# --- per-function defaults -------------------------------------------------------------------------


async def test_per_function_defaults_apply_and_the_request_wins(served, client):
    reply, _ = await served.call(client, "invoke_function", call_body("slow", "ASYNC", ms=10))
    requested = (await served.service.store.history(reply["execution_id"]))[0].event
    assert (requested.timeout_ms, requested.max_retries) == (300, 2)  # the function's, not the mode's
    body = {**call_body("slow", "ASYNC", ms=10), "context": {"timeout_ms": 5000, "max_retries": 0}}
    reply, _ = await served.call(client, "invoke_function", body)
    requested = (await served.service.store.history(reply["execution_id"]))[0].event
    assert (requested.timeout_ms, requested.max_retries) == (5000, 0)
    reply, _ = await served.call(client, "invoke_function", call_body("slow", ms=1000))  # past its 300 ms
    assert reply["result"]["status"] == ExecutionStatus.TIMEOUT and reply["result"]["attempt"] == 3


# --- the context -----------------------------------------------------------------------------------


async def test_the_context_tells_the_function_about_its_attempt(served, client):
    began = time.time()
    body = {**call_body("about", note="hello"), "context": {"timeout_ms": 20_000}}
    reply, _ = await served.call(client, "invoke_function", body)
    result = reply["result"]["result"]
    assert result["execution_id"] == reply["execution_id"]
    assert (result["task_id"], result["function_name"], result["attempt"]) == ("own", "about", 1)
    assert began + 19 < result["deadline"] < time.time() + 20 and 0 < result["seconds_left"] <= 20
    assert result["cancelled"] is False
    status, _ = await served.call(
        client, "get_execution_status", {"execution_id": reply["execution_id"], "include_logs": True}
    )
    assert status["logs"][0].endswith("[attempt 1] note: hello")
    assert status["logs"][1].endswith("[attempt 1] [progress 50%] half way"), status["logs"]  # (probe56: told apart)
    progress = [e.progress for e, _ in await served.service.store.history(reply["execution_id"]) if e.kind == "log"]
    assert progress == [None, 0.5]


@pytest.mark.parametrize("rounds", [1, 30])
async def test_progress_and_log_lines_are_stored_in_the_order_they_were_made(served, client, rounds):
    """Only a progress report followed at once by a newer one may be left out (coalesced)."""
    reply, _ = await served.call(client, "invoke_function", call_body("interleaved", rounds=rounds))
    assert reply["result"]["result"] == rounds
    stored = [e.message for e, _ in await served.service.store.history(reply["execution_id"]) if e.kind == "log"]
    made = ["p1", "l1", "p2", "p3", "l2", "p4"] * rounds
    position = 0  # in stored
    for index, message in enumerate(made):
        if position < len(stored) and stored[position] == message:
            position += 1
        else:  # left out: only a progress report followed at once by a newer one may be
            following = made[index + 1] if index + 1 < len(made) else ""
            assert message[0] == following[:1] == "p", stored
    assert position == len(stored), stored  # nothing stored that was not made, nor out of order


@pytest.mark.parametrize("function", ["exits", "exits_async"])
@pytest.mark.parametrize(
    "how, raised", [("interrupt", "KeyboardInterrupt"), ("exit", "SystemExit"), ("cancel", "CancelledError")]
)
async def test_keyboard_interrupt_or_system_exit_fails_the_execution_not_the_worker(
    served, client, function, how, raised
):
    reply, _ = await served.call(client, "invoke_function", call_body(function, how=how))
    result = reply["result"]
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), reply
    assert result["error_message"] == f"{raised}: {how}"
    again, _ = await served.call(client, "invoke_function", call_body("add", a=1, b=2))
    assert again["result"]["result"] == 3  # the worker serves on


@pytest.mark.parametrize("function", ["first_item", "first_item_inline", "first_item_async"])
async def test_a_function_raising_stop_iteration_fails_at_once(served, client, function):
    """probe28: a plain function (run in a thread) that raised StopIteration never ended its
    attempt: asyncio cannot set one on a future, so the attempt waited for its time limit and
    ended TIMEOUT. It fails as any exception does, as it does inline or in a coroutine."""
    body = {**call_body(function, items=[]), "context": {"timeout_ms": 5000}}
    reply, _ = await served.call(client, "invoke_function", body, timeout=10)
    result = reply["result"]
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), reply
    assert "StopIteration" in result["error_message"], result
    assert result["execution_time_ms"] < 2000, result
    again, _ = await served.call(client, "invoke_function", {**body, "parameters": [{"name": "items", "value": [7]}]})
    assert again["result"]["result"] == 7


@pytest.mark.parametrize("function", ["raises_no_message", "raises_no_message_inline", "raises_no_message_async"])
async def test_an_exception_with_no_message_is_said_by_its_type_alone(served, client, function):
    """probe66: `raise RuntimeError()` failed with "RuntimeError:", where its traceback ends
    "RuntimeError" (in a child process: test_isolation)."""
    reply, _ = await served.call(client, "invoke_function", call_body(function))
    result = reply["result"]
    assert (result["error_code"], result["error_message"]) == ("FUNCTION_ERROR", "RuntimeError"), result
    assert result["metrics"]["traceback"].endswith("\nRuntimeError"), result


async def test_an_exception_whose_message_cannot_be_read_or_is_huge_still_fails_as_function_error(served, client):
    """probe19: a `str()` that raises failed the worker's own handling, five deliveries, then
    POISON_MESSAGE (the SYNC caller got DEADLINE_EXCEEDED); a 20 MB message did not fit the
    failed event, and the attempt was counted as its worker's loss (WORKER_LOST)."""
    reply, _ = await served.call(client, "invoke_function", call_body("raises_unprintable"))
    result = reply["result"]
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), reply
    assert result["error_message"] == "Unprintable: <its message cannot be read: str() raised RuntimeError>"
    reply, _ = await served.call(client, "invoke_function", call_body("raises_at_length", chars=9_000_000))
    result = reply["result"]
    assert (result["status"], result["error_code"]) == (ExecutionStatus.FAILED, "FUNCTION_ERROR"), reply
    message = result["error_message"]
    assert len(message) == attempt_module.MAX_ERROR_CHARS and message.startswith("ValueError: xxx")
    assert message[-1] == "…"


async def test_log_lines_are_bounded_in_size_and_number(served, client, monkeypatch):
    monkeypatch.setattr(context_module, "MAX_LOGS_PER_ATTEMPT", 5)
    monkeypatch.setattr(context_module, "MAX_LOG_CHARS", 50)
    reply, _ = await served.call(client, "invoke_function", call_body("chatty", lines=20, width=200))
    assert reply["result"]["result"] == 20
    status, _ = await served.call(
        client, "get_execution_status", {"execution_id": reply["execution_id"], "include_logs": True}
    )
    lines = [line.split("] ", 1)[1] for line in status["logs"]]
    assert len(lines) == 6 and "at most 5 are kept" in lines[-1]
    assert all(len(line) == 50 and line.endswith("…") for line in lines[:5])


# --- served by `spear worker --task` ---------------------------------------------------------------


@pytest.mark.slow  # six spear processes
async def test_a_bad_task_spec_stops_start_up_with_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import spear\nnot_a_task = 42\n1 / 0\n")
    (tmp_path / "fine.py").write_text("import spear\nnot_a_task = 42\n")
    cases = {
        "missing_module:task": "no module named 'missing_module'",
        "broken:task": "importing broken failed: ZeroDivisionError: division by zero",
        "fine:nothing": "fine has no attribute 'nothing'",
        "fine:not_a_task": "fine.not_a_task is an int (42), not a spear.Task",
        "fine": "expected pkg.module:attr",
    }
    for spec, reason in cases.items():
        for command in ("worker", "up") if spec == "fine:nothing" else ("worker",):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spear",
                command,
                "--task",
                spec,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 30)
            lines = err.decode().strip().splitlines()
            assert process.returncode == 2, (spec, command, err)
            assert len(lines) == 1 and lines[0].startswith(f"spear: task {spec!r}: "), (spec, command, lines)
            assert reason in lines[0]
            assert out == b""


def test_tasks_come_from_the_settings_and_the_environment():
    from spear.core.config import load_settings

    settings = load_settings('[worker]\ntasks = ["a.b:c"]\ndemo = false\n', {"SPEAR_WORKER__TASKS": "x:y, z.w:v"})
    assert settings.worker.tasks == ["x:y", "z.w:v"] and settings.worker.demo is False
    assert load_settings().worker.tasks == [] and load_settings().worker.isolation == "thread"


def test_inline_is_for_plain_functions_and_runs_without_a_thread():
    from spear.worker.tasks import TaskDefinitionError

    task = spear.Task("inl")

    def gen():
        yield 1

    async def coro():
        return 1

    for fn, options in ((gen, {}), (coro, {}), (_module_level, {"isolation": "process"})):
        with pytest.raises(TaskDefinitionError, match="inline=True is for plain functions"):
            task.add(fn, inline=True, **options)
    function = task.add(_module_level, inline=True)
    assert function.inline and not function.in_process("process")  # stays on the loop


def _module_level(a: int, b: int = 2, **rest: int) -> int:
    return a + b


@pytest.mark.parametrize(
    "names",
    [set(), {"a"}, {"a", "b"}, {"b"}, {"a", "zzz"}, {"ctx"}],
)
def test_the_per_function_parameter_check_agrees_with_binding_the_signature(names):
    import inspect

    from spear.worker.tasks import ByName

    def strict(ctx: spear.Context, a: int, *, b: int = 1) -> int:
        return a

    for fn, context in ((strict, "ctx"), (_module_level, None)):
        signature = inspect.signature(fn)
        kwargs = dict.fromkeys(names, 0) | ({context: None} if context else {})
        try:
            signature.bind(**kwargs)
            binds = "ctx" not in names or context is None
        except TypeError:
            binds = False
        assert ByName.of(fn, context).fits(names) == binds, (fn.__name__, names)


def test_progress_that_is_not_a_number_is_no_report_and_out_of_range_is_clamped():
    from spear.worker.context import Context

    ctx, reports = Context("e", "t", "f", 1), []
    ctx.on_report = lambda progress, message: reports.append(progress)
    for given in (0.8, float("nan"), 2.0, -1.0, float("inf"), 0.25):
        ctx.progress(given)
    assert reports == [0.8, 1.0, 0.0, 1.0, 0.25]  # NaN left 0.8 standing, and reported nothing
    ctx.progress(float("nan"))
    assert ctx.latest_progress == 0.25
    ctx.progress(0.5, None)  # type: ignore[arg-type]  # no message (probe47: stored as "None")
    assert ctx.latest_progress_message == ""


UNSTOPPABLE = [("blocks", "ASYNC"), ("overruns_inline", "ASYNC"), ("overruns_inline", "SYNC")]


@pytest.mark.parametrize(("function", "mode"), UNSTOPPABLE)
async def test_a_function_that_cannot_be_stopped_and_ends_past_its_limit_times_out(served, client, function, mode):
    """probe47: a coroutine that blocked its loop 8 s, and an inline function 3 s, into a limit of
    1 s were stored COMPLETED: the limit is the attempt's, stopped there or not."""
    reply, _ = await served.call(client, "invoke_function", call_body(function, mode, ms=400))
    final, _ = await served.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_TIMEOUT"))
    result = final["result"]
    assert result["error_code"] == ErrorCode.TIMEOUT and result["result"] is None, result
    assert "ran past its time limit of 200 ms" in result["error_message"], result


async def test_a_timed_out_retry_says_its_attempt_once(served, client):
    """probe66: `TIMEOUT attempt 2 ran past its time limit of 700 ms (attempt 2)`."""
    from spear.cli.output import outcome_line

    body = {**call_body("slow", "ASYNC", ms=2000), "context": {"timeout_ms": 300, "max_retries": 1}}
    reply, _ = await served.call(client, "invoke_function", body)
    final, _ = await served.status_until(client, reply["execution_id"], has_status("EXECUTION_STATUS_TIMEOUT"))
    result = final["result"]
    assert result["attempt"] == 2 and result["error_message"] == "the function ran past its time limit of 300 ms"
    line = outcome_line(reply["execution_id"], result)
    assert line.count("attempt") == 1 and "TIMEOUT the function ran past its time limit of 300 ms (attempt 2)" in line


async def test_an_inline_function_on_the_usual_path_times_out_past_its_limit_too():
    """The attempt's usual path (a redelivery, or tracing on) holds inline functions to their
    limit as the quick one does."""
    function = own.functions["overruns_inline"]
    ctx = context_module.Context("x1", "own", "overruns_inline", 1)
    running = attempt_module.Running(ctx, function)
    outcome = await attempt_module.run_attempt(function, {"ms": 300}, running, 200, "", None, 1 << 20)
    assert outcome.result.status == ExecutionStatus.TIMEOUT and outcome.retryable, outcome.result


async def test_a_coroutine_that_returns_in_time_is_not_timed_out_by_a_busy_loop():
    """review49: the time a coroutine ran was read when the worker's loop got back to the
    attempt, which a busy loop makes later: one that returned within its limit was stored TIMEOUT."""
    function = own.functions["returns_before_a_busy_loop"]  # its limit: 300 ms
    ctx = context_module.Context("x2", "own", function.name, 1)
    running = attempt_module.Running(ctx, function)
    outcome = await attempt_module.run_attempt(function, {"ms": 500}, running, 300, "", None, 1 << 20)
    assert outcome.result.status == ExecutionStatus.COMPLETED and outcome.result.result == 500, outcome.result
