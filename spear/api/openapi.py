"""The OpenAPI 3.1 document of the HTTP API, generated from the route table and the very msgspec
Structs the code decodes and encodes, so it cannot drift from what the server does."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from spear import __version__
from spear.core import contract
from spear.core.contract import ErrorReply
from spear.core.enums import HTTP_STATUS, ErrorCode, ExecutionMode, ExecutionStatus, InvocationType
from spear.core.tokens import ADMIN

# The enums are components even where a field is a plain string (request fields take suffixes).
ENUMS: tuple[type, ...] = (ExecutionStatus, ExecutionMode, InvocationType, ErrorCode)

SCHEMA_REF = "#/components/schemas/{name}"
BEARER_TEXT = (
    "A token from `spear token create`, configured in [api] tokens or tokens_file. Without any "
    "configured token (loopback default) authentication is off. Each operation names its role."
)


@dataclass(frozen=True)
class QueryParam:
    """A query parameter of a route, as documented."""

    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Route:
    """One HTTP route: how it is served and how it is documented."""

    method: str
    path: str
    handler: Callable[..., Any]
    summary: str
    request: type | None = None  # JSON request body
    body_required: bool = True  # False: every field of `request` may be left out, and the body too
    responses: dict[int, Any] = field(default_factory=dict)  # status -> Struct, or a media type string
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = (400, 500, 503)  # (503 is added to every route: NATS may be unreachable)
    sse: bool = False  # 200 may also be an event stream (`Accept: text/event-stream`)
    # The token role it needs when authentication is on (spear/api/auth.py); None: open to all.
    # A route that says nothing is admin-only, so a new route is never open by mistake.
    role: str | None = ADMIN
    name: str = ""  # the operationId, when another route shares the handler

    @property
    def operation_id(self) -> str:
        """The OpenAPI operationId: the handler's name (an alias route shares it)."""
        return self.name or self.handler.__name__


def build_document(routes: list[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`, with every Struct and enum they use as a component."""
    structs: set[type] = {ErrorReply}
    for route in routes:
        if route.request:
            structs.add(route.request)
        structs.update(r for r in route.responses.values() if isinstance(r, type))
    kinds = [*sorted(structs, key=lambda s: s.__name__), *ENUMS]
    _, schemas = msgspec.json.schema_components(kinds, ref_template=SCHEMA_REF)
    _drop_defaults_outside_patterns(schemas)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    document: dict[str, Any] = _portable_patterns(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "spear",
                "version": __version__,
                "description": "Event-sourced function invocation on NATS JetStream (CONTRACT.md §5).",
            },
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": BEARER_TEXT}},
            },
        }
    )
    return document


def _portable_patterns(node: Any) -> Any:
    """The document with its patterns as JSON Schema reads them (ECMA-262, and RE2 for Go's tools):
    Python's `$` also matches before a final newline, so spear's own patterns end `$(?!\n)`; a
    lookahead RE2 cannot compile (probe50), and without the `m` flag ECMA's `$` is the end."""
    if isinstance(node, dict):
        return {
            key: value.removesuffix(r"(?!\n)")
            if key == "pattern" and isinstance(value, str)
            else _portable_patterns(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_portable_patterns(item) for item in node]
    return node


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": {str(status): _response(kind) for status, kind in route.responses.items()},
    }
    errors = route.errors if route.role is None else (*route.errors, 401, 403)
    for status in (*errors, 503):
        operation["responses"].setdefault(str(status), _response(ErrorReply, _error_text(status)))
    if route.role is not None:
        operation["security"] = [{"bearer": []}]
        operation["description"] = f"Needs a bearer token with the role `{route.role}` when authentication is on."
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": contract.ID_REGEX},
        }
        for name in _path_names(route.path)
    ]
    parameters += [
        {"name": q.name, "in": "query", "required": False, "schema": q.schema, "description": q.description}
        for q in route.query
    ]
    if route.sse:
        operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": SSE_SCHEMA}
        if route.method == "GET":
            parameters.append(LAST_EVENT_ID)
    if parameters:
        operation["parameters"] = parameters
    if "202" in operation["responses"]:  # accepted: where to follow it
        operation["responses"]["202"]["headers"] = {"Location": LOCATION}
    if route.request:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": {"$ref": SCHEMA_REF.format(name=route.request.__name__)}}},
        }
    return operation


SSE_SCHEMA = {
    "type": "string",
    "description": "Server-Sent Events: each stored event as `id: <stream sequence>`, `event: <kind>`, "
    "`data: <the event's JSON>`, in order, ending after the terminal event; `: keep-alive` comments",
}
LOCATION = {
    "description": "the execution's status endpoint (`/api/v1/execution/{id}/status`), as `status_endpoint` says",
    "schema": {"type": "string"},
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
    "description": "resume an event stream after this event (its `id`, a stream sequence)",
}


def _drop_defaults_outside_patterns(schemas: dict[str, Any]) -> None:
    """An id field's default "" is "not given" (the server makes one, or refuses the request): it
    is no value of the field's pattern, and a schema whose default breaks its own pattern is
    invalid, so the default is left out of the document."""
    for schema in schemas.values():
        for prop in schema.get("properties", {}).values():
            pattern, default = prop.get("pattern"), prop.get("default")
            if isinstance(pattern, str) and isinstance(default, str) and not re.search(pattern, default):
                del prop["default"]


def _response(kind: Any, description: str = "") -> dict[str, Any]:
    if isinstance(kind, type):
        return {
            "description": description or kind.__name__,
            "content": {"application/json": {"schema": {"$ref": SCHEMA_REF.format(name=kind.__name__)}}},
        }
    media, schema = kind
    return {"description": description or media, "content": {media: {"schema": schema}}}


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _error_text(status: int) -> str:
    codes = [code for code, http in HTTP_STATUS.items() if http == status]
    return "error: " + (", ".join(codes) if codes else str(status))
