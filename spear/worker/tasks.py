"""`spear.Task`: a named set of Python functions a worker serves, and its public description.

Code declares a task and decorates its functions; the task's `TaskInfo` (contract) is what
workers publish to the task registry bucket, so gateways check task names, function names and
parameters, and apply per-function defaults, without importing the code.

    shop = spear.Task("shop", description="order functions")

    @shop.function
    def total(prices: list[float], tax: float = 0.0) -> float: ...

    @shop.function(timeout_ms=60_000, max_retries=2, isolation="process")
    def report(ctx: spear.Context, month: str) -> dict: ...
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, KeysView
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from spear.core import contract
from spear.core.contract import FunctionInfo, ParameterInfo, TaskInfo
from spear.worker.context import Context
from spear.worker.paramtypes import ParameterTypes

F = TypeVar("F", bound=Callable[..., Any])
# A function spear runs itself (a registered process artifact): (parameters, ctx, chunk sink or
# None, whether the call is STREAM) -> result. It binds no parameters: any JSON object goes.
NativeCall = Callable[[dict[str, Any], Context, Any, bool], Awaitable[Any]]
Isolation = Literal["thread", "process"]
ISOLATIONS = ("thread", "process")


class TaskDefinitionError(ValueError):
    """A task or function that cannot be served as declared (bad id, unusable signature)."""


@dataclass(frozen=True)
class Function:
    """One function of a task, with what the worker needs to call it."""

    name: str
    fn: Callable[..., Any]
    context_parameter: str | None  # the parameter that receives the Context, if any
    streaming: bool  # a generator: each item is a `chunk` event
    timeout_ms: int = 0  # 0: the execution mode's default
    max_retries: int | None = None  # None: the execution mode's default
    isolation: Isolation | None = None  # None: the worker's default
    native: NativeCall | None = None  # set for functions spear runs itself (process artifacts)
    inline: bool = False  # a quick plain function, called on the worker's loop (no thread)

    def in_process(self, default: Isolation) -> bool:
        """Whether calls run in a child process: the function's own isolation, else the worker's
        default, for plain functions that a child can import (others run in a thread or on the loop)."""
        wanted = self.isolation or default
        return (
            wanted == "process"
            and not self.inline
            and not self.is_coroutine
            and not self.is_async_generator
            and _importable(self.fn)
        )

    # Read once per function, not per call (a frozen dataclass still has a __dict__ for these).
    @functools.cached_property
    def is_coroutine(self) -> bool:
        """Whether the function runs as a coroutine (a native function does too)."""
        return self.native is not None or inspect.iscoroutinefunction(self.fn)

    @functools.cached_property
    def is_async_generator(self) -> bool:
        """Whether the function is an async generator (a streaming function)."""
        return inspect.isasyncgenfunction(self.fn)

    @functools.cached_property
    def by_name(self) -> ByName:
        """The parameters a call passes by name, read once from the signature."""
        return ByName.of(self.fn, self.context_parameter)

    @functools.cached_property
    def call_form(self) -> str:
        """How it is called, for messages: `add(a, b=…)`."""
        return self.info().call_form()

    @functools.cached_property
    def parameter_types(self) -> ParameterTypes | None:
        """The parameters taken at their annotated types (None: none is annotated so)."""
        return ParameterTypes.of(self.fn, self.context_parameter)

    def info(self) -> FunctionInfo:
        """The function as the task registry describes it."""
        signature = inspect.signature(self.fn)
        parameters = [
            ParameterInfo(
                name=p.name,
                type=_annotation_text(p.annotation),
                required=p.default is inspect.Parameter.empty,
            )
            for p in signature.parameters.values()
            if p.name != self.context_parameter and p.kind in _BY_NAME
        ]
        var_keyword = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        return FunctionInfo(
            name=self.name,
            parameters=parameters,
            accepts_any=bool(var_keyword),
            var_keyword=var_keyword[0] if var_keyword else "",
            description=(inspect.getdoc(self.fn) or "").split("\n", 1)[0],
            streaming=self.streaming,
            timeout_ms=self.timeout_ms,
            max_retries=self.max_retries,
            context_parameter=self.context_parameter or "",
        )


_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class ByName:
    """What a call may pass by name (the Context's parameter aside): checked per call with two set
    operations instead of binding the signature."""

    accepted: frozenset[str]
    required: frozenset[str]
    takes_any: bool  # **kwargs

    @classmethod
    def of(cls, fn: Callable[..., Any], context_parameter: str | None) -> ByName:
        """Read `fn`'s signature."""
        named = [p for p in inspect.signature(fn).parameters.values() if p.name != context_parameter]
        return cls(
            accepted=frozenset(p.name for p in named if p.kind in _BY_NAME),
            required=frozenset(p.name for p in named if p.kind in _BY_NAME and p.default is inspect.Parameter.empty),
            takes_any=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in named),
        )

    def fits(self, names: Iterable[str]) -> bool:
        """Whether a call passing exactly `names` binds."""
        given = names if isinstance(names, (set, frozenset, KeysView)) else set(names)
        return self.required <= given and (self.takes_any or given <= self.accepted)


@dataclass
class Task:
    """A named set of functions. `task_id` is checked at once (it becomes a NATS subject token)."""

    task_id: str
    name: str = ""
    description: str = ""
    module: str = ""  # where the code lives, reported as the task's artifact (default: the caller's module)
    functions: dict[str, Function] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.task_id, "task_id")
        if not self.module:
            caller = inspect.currentframe()
            caller = caller.f_back.f_back if caller and caller.f_back else None  # past the dataclass __init__
            self.module = str(caller.f_globals.get("__name__", "")) if caller else ""

    @overload
    def function(self, fn: F, /) -> F: ...

    @overload
    def function(
        self,
        *,
        name: str | None = None,
        timeout_ms: int = 0,
        max_retries: int | None = None,
        isolation: Isolation | None = None,
        inline: bool = False,
    ) -> Callable[[F], F]: ...

    def function(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        timeout_ms: int = 0,
        max_retries: int | None = None,
        isolation: Isolation | None = None,
        inline: bool = False,
    ) -> Any:
        """Decorator, bare (`@task.function`) or with options (`@task.function(timeout_ms=…)`).

        `timeout_ms` and `max_retries` are this function's defaults: a request's own values win.
        `isolation="process"` runs a plain function in a worker-owned process that is killed on
        timeout or forced cancellation. `inline=True` declares a plain function quick, non-blocking
        (microseconds) and free of side effects: it is called on the worker's event loop, without
        a thread hop, and runs to its end (a time limit or cancel cannot stop it; it may run for
        an execution cancelled at that moment, its result discarded). The function is returned
        unchanged."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(fn, name=name, timeout_ms=timeout_ms, max_retries=max_retries, isolation=isolation, inline=inline)
            return fn

        return register(fn) if fn is not None else register

    def add(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        timeout_ms: int = 0,
        max_retries: int | None = None,
        isolation: Isolation | None = None,
        inline: bool = False,
    ) -> Function:
        """Register `fn` (what the decorator does); raises TaskDefinitionError with the reason."""
        if not callable(fn):
            raise TaskDefinitionError(f"task {self.task_id!r}: {fn!r} is not a function")
        function_name: str = name or str(getattr(fn, "__name__", ""))
        where = f"task {self.task_id!r} function {function_name!r}"
        _check_id(function_name, f"{where}: function name")
        if function_name in self.functions:
            raise TaskDefinitionError(f"{where} is defined twice")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 0:
            raise TaskDefinitionError(f"{where}: timeout_ms must be a non-negative integer")
        if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int)):
            raise TaskDefinitionError(f"{where}: max_retries must be a non-negative integer or None")
        if max_retries is not None and max_retries < 0:
            raise TaskDefinitionError(f"{where}: max_retries must be a non-negative integer or None")
        if isolation is not None and isolation not in ISOLATIONS:
            raise TaskDefinitionError(f"{where}: isolation must be one of {', '.join(ISOLATIONS)}")
        streaming = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
        if isolation == "process" and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise TaskDefinitionError(f"{where}: isolation='process' runs plain functions, not async ones")
        if isolation == "process" and not _importable(fn):
            raise TaskDefinitionError(
                f"{where}: isolation='process' needs a module-level function (the child process imports it)"
            )
        if inline and (streaming or inspect.iscoroutinefunction(fn) or isolation == "process"):
            raise TaskDefinitionError(
                f"{where}: inline=True is for plain functions (not generators, async ones or isolation='process')"
            )
        function = Function(
            name=function_name,
            fn=fn,
            context_parameter=_context_parameter(fn, where),
            streaming=streaming,
            timeout_ms=timeout_ms,
            max_retries=max_retries,
            isolation=isolation,
            inline=inline,
        )
        self.functions[function_name] = function
        return function

    def info(self) -> TaskInfo:
        """The task as the task registry describes it."""
        return TaskInfo(
            task_id=self.task_id,
            task_name=self.name or self.task_id,
            description=self.description,
            artifact_spec={"artifact_type": "python", "location": self.module},
            functions=[function.info() for _, function in sorted(self.functions.items())],
        )


def _check_id(value: Any, what: str) -> None:
    if not isinstance(value, str) or not contract.ID_PATTERN.fullmatch(value):
        raise TaskDefinitionError(f"{what} must be 1 to 128 characters from [A-Za-z0-9_-], got {value!r}")


def _context_parameter(fn: Callable[..., Any], where: str) -> str | None:
    """The parameter that receives the Context: one annotated `spear.Context`, else one named `ctx`.
    Parameters that cannot be passed by name are refused here rather than at the first call."""
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to their text
        hints = {}
    found = None
    for parameter in signature.parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        if annotation is Context or (isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == "Context"):
            if found is not None:  # (probe29: only one of them got it)
                raise TaskDefinitionError(
                    f"{where}: parameters {found!r} and {parameter.name!r} both take the Context; one may"
                )
            found = parameter.name
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TaskDefinitionError(f"{where}: parameter {parameter.name!r} is positional-only; spear passes by name")
    if found is None and "ctx" in signature.parameters:
        found = "ctx"
    return found


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _importable(fn: Callable[..., Any]) -> bool:
    """Whether a child process can find `fn` by module and qualified name."""
    qualname = getattr(fn, "__qualname__", "")
    return bool(getattr(fn, "__module__", None)) and bool(qualname) and "<" not in qualname
