"""The one-shot commands: `spear invoke | status`. Each sends one request to the gateway and
shows the reply."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Coroutine
from typing import Any

import nats
import nats.errors

from spear.cli.output import show_json
from spear.core.config import Settings
from spear.jetstream.connection import credentials


def add_parsers(commands: Any) -> None:
    """Register the one-shot commands on the `spear` subcommand parser."""
    invoke = commands.add_parser("invoke", help="invoke a function: spear invoke demo calculate_fibonacci n=30")
    invoke.add_argument("task_id")
    invoke.add_argument("function_name")
    invoke.add_argument("parameters", nargs="*", metavar="name=value", help="value is JSON, or else a string")
    invoke.add_argument("--async", dest="use_async", action="store_true", help="return at once with an execution_id")
    invoke.add_argument("--timeout-ms", type=int, default=0)
    invoke.add_argument("--execution-id")
    invoke.add_argument("--nats-url")

    status = commands.add_parser("status", help="show an execution's status")
    status.add_argument("execution_id")
    status.add_argument("--nats-url")

    token = commands.add_parser("token", help="HTTP API bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="mint a token; print it and the hashed line to store")
    create.add_argument("--role", action="append", required=True, help="invoke, read or admin (repeatable)")
    create.add_argument("--name", default="token", help="a name for the token (shown in 403 messages)")


def command(settings: Settings, args: argparse.Namespace) -> Coroutine[Any, Any, int] | None:
    """The coroutine that runs `args.command`, or None when it is not a one-shot command."""
    match args.command:
        case "invoke":
            wait_s = (args.timeout_ms or settings.sync_execution.default_timeout_ms) / 1000 + 5
            return call(settings, "invoke_function", invoke_request(args), wait_s)
        case "status":
            return call(settings, "get_execution_status", {"execution_id": args.execution_id}, 10)
        case "token":
            return create_token(args.name, args.role)
    return None


async def create_token(name: str, role_flags: list[str]) -> int:
    """Print a new token (for the client) and its hashed line (for [api] tokens or the tokens file)."""
    from spear.core.tokens import TokenFormatError, hash_token, new_token

    token = new_token()
    roles = {role for flag in role_flags for role in flag.split(",") if role}
    try:
        stored = hash_token(name, roles, token)
    except TokenFormatError as exc:
        print(f"spear: {exc}", file=sys.stderr)
        return 2
    print("# the token, for the client (stored nowhere: keep it now):", file=sys.stderr)
    print(f"SPEAR_TOKEN={token}")
    print("# the line for [api] tokens or the tokens file:", file=sys.stderr)
    print(stored.line())
    return 0


def parse_parameter(text: str) -> dict[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep:
        raise SystemExit(f"parameter {text!r} is not name=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return {"name": name, "value": value}


async def call(settings: Settings, operation: str, request: dict[str, Any], timeout_s: float) -> int:
    from spear.core.names import Names

    subject = Names(settings.subject_prefix).api(operation)
    try:
        nc = await nats.connect(
            settings.nats.urls,
            connect_timeout=3,
            max_reconnect_attempts=0,
            **credentials(settings),
        )
    except Exception as exc:
        print(f"spear: cannot reach NATS at {','.join(settings.nats.urls)}: {exc}", file=sys.stderr)
        return 1
    try:
        reply = await nc.request(subject, json.dumps(request).encode(), timeout=timeout_s)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        print(f"spear: no reply on {subject} ({type(exc).__name__}): is `spear up` running?", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    show_json(json.loads(reply.data))
    return 1 if reply.headers and "Nats-Service-Error-Code" in reply.headers else 0


def invoke_request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {
        "task_id": args.task_id,
        "function_name": args.function_name,
        "parameters": [parse_parameter(p) for p in args.parameters],
        "execution_mode": "ASYNC" if args.use_async else "SYNC",
        "context": {"timeout_ms": args.timeout_ms},
    }
    if args.execution_id:
        request["execution_id"] = args.execution_id
    return request
