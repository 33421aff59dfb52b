"""The one-shot commands: `spear invoke | status | watch | cancel | executions | tasks | workers`.
Each talks to spear through `spear.Client` and shows what it got: for people by default (results
on stdout, status lines on stderr), or as JSON with `--json`; its exit code says the outcome
(cli/outcomes.py)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import msgspec

from spear import errors
from spear.cli import outcomes, output
from spear.cli.arguments import non_negative
from spear.cli.output import say, show_json
from spear.client import Client, Event, ExecutionHandle, invoke_request, stream_restart, sync_wait
from spear.core.config import Settings
from spear.core.contract import finished_message
from spear.core.ids import new_execution_id
from spear.service.callerwait import NEW_ID_HEADER


class UsageError(Exception):
    """Bad command-line input found after parsing (exit 2)."""


@dataclass
class Session:
    """What a command is doing, so that an interruption or an error can name the execution."""

    json: bool = False
    execution_id: str = ""
    settings: Settings | None = None  # those loaded: a SYNC call's wait follows their [retry] and max_wait_ms


def add_parsers(commands: Any, common: argparse.ArgumentParser, positive: Any) -> None:
    """Register the one-shot commands on the `spear` subcommand parser; `common` holds the flags
    every one of them takes (`--json`, `--nats-url`); `positive` parses a positive integer."""
    invoke = commands.add_parser(
        "invoke",
        parents=[common],
        help="invoke a function: spear invoke demo calculate_fibonacci n=30",
        description="Run a function and show its result. Exit code: 0 completed, 1 failed, 3 timed out, 4 cancelled.",
    )
    invoke.add_argument("task_id")
    invoke.add_argument("function_name")
    invoke.add_argument(
        "parameters", nargs="*", default=[], metavar="name=value", help="value is JSON, or else a string (none or many)"
    )
    how = invoke.add_mutually_exclusive_group()
    how.add_argument("--async", dest="use_async", action="store_true", help="print the execution id at once")
    how.add_argument("--wait", action="store_true", help="run as ASYNC (retries, queue) and wait for the end")
    how.add_argument("--stream", action="store_true", help="STREAM mode: print each chunk as it comes")
    invoke.add_argument(
        "--timeout-ms", type=non_negative, default=0, help="time limit of one attempt (0: the mode's default)"
    )
    invoke.add_argument("--max-retries", type=int, default=None, help="further attempts after a failure")
    invoke.add_argument("--execution-id", help="idempotency key: the same id runs once")

    status = commands.add_parser("status", parents=[common], help="show an execution's status")
    status.add_argument("execution_id")
    status.add_argument("--logs", action="store_true", help="include the function's log lines")

    watch = commands.add_parser("watch", parents=[common], help="follow an execution's events live until it ends")
    watch.add_argument("execution_id")

    cancel = commands.add_parser("cancel", parents=[common], help="cancel an execution")
    cancel.add_argument("execution_id")
    cancel.add_argument("--reason", default="", help="recorded with the cancellation")
    cancel.add_argument("--force", action="store_true", help="do not wait for the function to stop")

    executions = commands.add_parser("executions", parents=[common], help="list executions, newest first")
    executions.add_argument("--task", dest="task_id", default="", help="only this task's")
    executions.add_argument("--function", default="", help="only this function's")
    executions.add_argument("--status", default="", help="only those in this status (completed, failed, ...)")
    executions.add_argument("--limit", type=positive, default=20, help="executions per page (default 20)")
    executions.add_argument("--after", default="", metavar="EXECUTION_ID", help="the page after this execution")
    executions.add_argument("--all", action="store_true", help="every page")
    executions.add_argument("--oldest-first", action="store_true", help="oldest first instead")

    commands.add_parser("tasks", parents=[common], help="list the tasks and their functions")
    commands.add_parser("workers", parents=[common], help="list the running workers and what they serve")

    commands.add_parser("nats-users", help="print nats-server users per role (least privilege) for this prefix")

    token = commands.add_parser("token", help="HTTP API bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="mint a token; print it and the hashed line to store")
    create.add_argument("--role", action="append", required=True, help="invoke, read or admin (repeatable)")
    create.add_argument("--name", default="token", help="a name for the token (shown in 403 messages)")


def command(settings: Settings, args: argparse.Namespace, session: Session) -> Coroutine[Any, Any, int] | None:
    """The coroutine that runs `args.command`, or None when it is not a one-shot command."""
    if args.command == "token":
        return create_token(args.name, args.role)
    if args.command == "nats-users":
        return print_nats_users(settings)
    run = _COMMANDS.get(args.command)
    session.settings = settings
    return _with_client(run, settings, args, session) if run else None


async def _with_client(run: Any, settings: Settings, args: argparse.Namespace, session: Session) -> int:
    async with client_for(settings) as client:
        code: int = await run(client, args, session)
        return code


def client_for(settings: Settings) -> Client:
    """A spear Client for the configured NATS, prefix and credentials."""
    from spear.jetstream.connection import tls_context

    nats = settings.nats
    return Client(
        nats.urls,
        prefix=settings.subject_prefix,
        user=nats.user,
        password=nats.password,
        token=nats.token,
        creds_file=nats.creds_file,
        tls=tls_context(settings),
        connect_timeout=1.5,  # an unreachable NATS is told within 3 s, start-up included
        request_timeout=10.0,
        name="spear-cli",
    )


async def print_nats_users(settings: Settings) -> int:
    """`spear nats-users`: print the NATS users and permissions of each role."""
    from spear.core.names import Names
    from spear.jetstream.permissions import users_file

    print(users_file(Names(settings.subject_prefix)), end="")
    return 0


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


# --- invoke -------------------------------------------------------------------------------------


def parse_parameters(texts: list[str]) -> dict[str, Any]:
    """`n=30 tags=["a"] name=ann` → {"n": 30, "tags": ["a"], "name": "ann"}: JSON, else a string.
    Strict JSON: `NaN` and `Infinity` are strings (Python's json made them floats the request could
    not carry: the server answered "malformed JSON", naming no parameter); a number too big for a
    double (`1e400`) is a usage error."""
    params: dict[str, Any] = {}
    for text in texts:
        name, sep, raw = text.partition("=")
        if not sep or not name:
            raise UsageError(f"parameter {text!r} is not name=value")
        if name in params:
            raise UsageError(f"parameter {name!r} is given twice")
        try:
            params[name] = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            if "out of range" in str(exc):
                raise UsageError(
                    f"parameter {name!r}: {raw} is a number out of range (JSON numbers here are doubles)"
                ) from None
            params[name] = raw
    return params


# A declared type of text, as the task's description shows it: the annotation's text (`str`,
# `Optional[str]`, `str | None`, `Union[str, None]`, `Annotated[str, …]`, `typing.` or not)
TEXT_TYPE = re.compile(
    r"(?:typing\.)?(?:str|str \| None|None \| str|Optional\[str\]|Union\[(?:str, ?None|None, ?str)\]"
    r"|Annotated\[str,.*\])"
)
# ... of which these take no text for `null` (None): given `name=null`, the function gets None
NULLABLE_TEXT_TYPE = re.compile(
    r"(?:typing\.)?(?:str \| None|None \| str|Optional\[str\]|Union\[(?:str, ?None|None, ?str)\])"
)


async def _as_text_where_declared(
    client: Client, task_id: str, function_name: str, parameters: dict[str, Any], texts: list[str]
) -> None:
    """`order_id=42` for a parameter the function declares `str` is the text "42", not the number
    (probe52: a worker takes values at their annotated types, and refused the number). Asked of
    the task's published description only when a value read as something other than text."""
    if all(isinstance(value, str) for value in parameters.values()):  # (null is not: it may be text)
        return
    try:
        task = await client.task(task_id)
    except errors.SpearError:  # unknown, or not readable with these credentials: the invoke says so
        return
    declared: dict[str, Any] = next((f for f in task.get("functions", []) if f.get("name") == function_name), {})
    types = {p.get("name"): str(p.get("type", "")) for p in declared.get("parameters", [])}
    for text in texts:
        name, _, raw = text.partition("=")
        if sent_as_text(parameters.get(name), types.get(name, "")):
            parameters[name] = raw


def sent_as_text(value: Any, declared_type: str) -> bool:
    """Whether a command-line value that read as JSON `value` goes as its text instead, for a
    parameter of `declared_type`. `null` stays None only where the function takes None (probe66:
    `name=null` for a plain `str` was refused, "expected a string, got null")."""
    if isinstance(value, str) or not TEXT_TYPE.fullmatch(declared_type):
        return False
    return value is not None or not NULLABLE_TEXT_TYPE.fullmatch(declared_type)


async def invoke(client: Client, args: argparse.Namespace, session: Session) -> int:
    """`spear invoke`: invoke a function and show its result (or, with --async, its id)."""
    mode = "STREAM" if args.stream else "ASYNC" if args.use_async or args.wait else "SYNC"
    timeout = args.timeout_ms / 1000 if args.timeout_ms else None
    # The id is made here (a ULID, as the server would) so that an interruption, or a reply that
    # never comes, can still name the execution to follow.
    session.execution_id = new_execution_id() if args.execution_id is None else args.execution_id
    parameters = parse_parameters(args.parameters)
    await _as_text_where_declared(client, args.task_id, args.function_name, parameters, args.parameters)
    request = invoke_request(
        args.task_id,
        args.function_name,
        mode,
        parameters,
        session.execution_id,
        timeout,
        args.max_retries,
    )
    wait = None
    if mode == "SYNC":
        loaded = session.settings
        retry, max_wait_ms = (loaded.retry, loaded.sync_execution.max_wait_ms) if loaded else (None, None)
        wait = sync_wait(timeout, args.max_retries, retry, max_wait_ms)
    made_here = {NEW_ID_HEADER: "true"} if args.execution_id is None else None  # inline calls still run in the gateway
    reply = await client.invoke_function(request, made_here, wait)  # (asked again where busy: as the SDK asks)
    session.execution_id = reply["execution_id"]
    if mode == "SYNC":
        return _finished(session, reply["execution_id"], reply.get("result") or {}, reply)
    handle = ExecutionHandle(client, reply["execution_id"], reply)
    if args.stream:
        # (joined: an id of its own named an execution stored before, which may have run before;
        # a new one's every run is output, probe61)
        return await _stream(client, handle, session, args.task_id, args.function_name, handle.joined)
    if args.wait:
        if sys.stderr.isatty() and not session.json:
            result = await _wait_showing_progress(handle)
        else:
            result = await handle.wait()
        ended = {**reply, "message": finished_message(str(result.get("status", ""))), "result": result}
        return _finished(session, handle.id, result, ended)
    if session.json:
        show_json(reply)
    else:
        print(handle.id, flush=True)
        say(f"{output.word(reply['result']['status'])} · follow it: spear watch {handle.id}")
    return outcomes.OK


async def _wait_showing_progress(handle: ExecutionHandle) -> dict[str, Any]:
    """Wait for the end, drawing the function's progress reports as a bar on the terminal."""
    events = handle.events()
    async with aclosing(events):
        async for event in events:
            if event.progress is not None:
                line = output.plain(f"{output.bar(event.progress)} {event.message}".rstrip())
                print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
            elif event.terminal:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
                return event.result
    return await handle.wait()  # not reached: events() ends with the terminal event


def _finished(session: Session, execution_id: str, result: dict[str, Any], document: dict[str, Any]) -> int:
    """Show an ended execution: its result on stdout and a status line on stderr (or the JSON
    document); the exit code is its outcome."""
    status = str(result.get("status", ""))
    if session.json:
        show_json(document)
    elif status == "EXECUTION_STATUS_COMPLETED":
        print(output.for_stream(output.value(result.get("result")), sys.stdout), flush=True)
        say(output.outcome_line(execution_id, result))
    else:
        say(f"spear: {output.outcome_line(execution_id, result)}")
        traceback = (result.get("metrics") or {}).get("traceback")
        if traceback:  # where the function failed (spear/worker/failures.py)
            say(str(traceback))
    return outcomes.for_status(status)


async def _stream(
    client: Client, handle: ExecutionHandle, session: Session, task_id: str, function_name: str, joined: bool
) -> int:
    """Each chunk as it is stored (one line each), then the outcome: the chunks were the output.
    An execution joined by its id starts at its last run (the ones a restart made void are not
    output: probe55)."""
    events = handle.events(after_seq=await handle.last_run_start() if joined else 0)

    async def yields() -> bool:
        return await client.yields_items(task_id, function_name)

    async with aclosing(events):
        return await _show_stream(handle.id, events, session, yields)


async def _show_stream(
    execution_id: str, events: AsyncIterator[Event], session: Session, yields: Callable[[], Awaitable[bool]]
) -> int:
    """Text chunks are written as they are (a model's tokens join up), other values one JSON per
    line; with --json, one line per chunk and a last one with the outcome. A function that is not
    a generator (`yields()` False, asked only when no chunk came) stores no chunk: what it
    returned is written as its output (with --json, it is in the outcome's line)."""
    ends_line, chunked, since_start = True, False, False
    async for event in events:
        if event.type == "chunk":
            data = event.data.get("data")
            chunked = since_start = True
            if session.json:
                show_json({"seq": event.data.get("seq"), "attempt": event.attempt, "data": data}, indent=None)
            else:
                ends_line = _write_chunk(data, line_open=not ends_line)
        elif since_start and (restart := stream_restart(event)) is not None:  # what came is void
            attempt, what = restart
            if not ends_line:
                print(flush=True)
            ends_line, since_start = True, False
            say(f"spear: {what}; attempt {attempt} starts the stream again")  # on stderr, --json or not
        elif event.terminal:
            status = str(event.result.get("status", ""))
            failed = status != "EXECUTION_STATUS_COMPLETED"
            if session.json:
                show_json({"execution_id": execution_id, "result": event.result}, indent=None)
            else:
                value = event.result.get("result")
                if not (chunked or failed or value is None) and not await yields():
                    ends_line = _write_chunk(value)
                if not ends_line:
                    print(flush=True)
                say(("spear: " if failed else "") + output.outcome_line(execution_id, event.result))
            return outcomes.for_status(status)
    return outcomes.OK


def _write_chunk(data: Any, line_open: bool = False) -> bool:
    """Write one chunk's data (text as it is, anything else as a JSON line of its own: after
    text that left its line open, on the next one; probe61 saw `plain text3`); True if it ended a
    line."""
    text = data if isinstance(data, str) else ("\n" if line_open else "") + output.value(data) + "\n"
    sys.stdout.write(output.for_stream(text, sys.stdout))
    sys.stdout.flush()
    return text.endswith("\n") if text else not line_open  # (an empty chunk leaves the line as it was)


# --- looking at executions ----------------------------------------------------------------------


async def status(client: Client, args: argparse.Namespace, session: Session) -> int:
    """`spear status`: show an execution's status, optionally following it."""
    session.execution_id = args.execution_id
    execution = await client.status(args.execution_id, include_logs=args.logs)
    if session.json:
        show_json(execution.raw)
    else:
        print(output.execution_table(execution), flush=True)
    return outcomes.for_status(execution.status)


async def watch(client: Client, args: argparse.Namespace, session: Session) -> int:
    """The execution's events as a timeline, live until it ends; on a terminal, progress reports
    redraw one line as a progress bar."""
    session.execution_id = args.execution_id
    await client.status(args.execution_id)  # NOT_FOUND now, rather than waiting for events forever
    events = client.execution(args.execution_id).events()
    async with aclosing(events):
        return await _timeline(events, session)


async def _timeline(events: AsyncIterator[Event], session: Session) -> int:
    redraw = sys.stdout.isatty() and not session.json
    pending_line = False
    async for event in events:
        if session.json:
            show_json({"seq": event.seq, **event.data}, indent=None)
        elif redraw and event.progress is not None:
            print("\r\033[K" + output.event_line(event), end="", flush=True)
            pending_line = True
        else:
            print(("\n" if pending_line else "") + output.event_line(event), flush=True)
            pending_line = False
        if event.terminal:
            return outcomes.for_status(str(event.result.get("status", "")))
    return outcomes.OK


async def cancel(client: Client, args: argparse.Namespace, session: Session) -> int:
    """`spear cancel`: cancel an execution and show its status after."""
    session.execution_id = args.execution_id
    request = {"execution_id": args.execution_id, "reason": args.reason, "force": args.force}
    try:
        reply = await client.request("cancel_execution", request)
    except errors.FailedPrecondition as ended:
        # Already cancelled: what was asked for is so (probe31: exit 1, as if it had failed)
        done = ended.final_status == "EXECUTION_STATUS_CANCELLED"
        if session.json:
            if not done:
                raise
            show_json(ended.reply or {})
            return outcomes.OK
        say(f"spear: execution {args.execution_id} had already ended: {output.word(ended.final_status)}")
        return outcomes.OK if done else outcomes.FAILED
    if session.json:
        show_json(reply)
    elif reply.get("final_status") == "EXECUTION_STATUS_CANCELLED":
        print(f"cancelled · execution {args.execution_id}", flush=True)
    else:
        print(f"cancellation requested; the function has not stopped yet · spear watch {args.execution_id}")
    return outcomes.OK


async def executions(client: Client, args: argparse.Namespace, session: Session) -> int:
    """A page (or with --all every page, printed as they come; one JSON document in the end)."""
    after = args.after
    listed: list[dict[str, Any]] = []
    while True:
        page = await client.executions(
            task_id=args.task_id,
            status=args.status,
            limit=args.limit,
            start_after=after,
            function_name=args.function,
            order="asc" if args.oldest_first else "desc",
        )
        rows = page.get("executions", [])
        if not session.json and (rows or listed):
            _execution_rows(rows, header=not listed)
        listed += rows
        after = page.get("next_start_after", "")
        if not (args.all and page.get("has_more") and after):
            break
    if session.json:
        show_json({**page, "executions": listed})
    elif not listed:
        say("no executions" + (" match" if args.task_id or args.status or args.function else ""))
    elif page.get("has_more"):
        say(f"more: spear executions --after {page['next_start_after']}" + _filters(args))
    return outcomes.OK


def _execution_rows(rows: list[dict[str, Any]], header: bool) -> None:
    text = output.table(
        ("EXECUTION", "TASK", "FUNCTION", "STATUS", "DURATION", "REQUESTED"),
        (
            (
                e["execution_id"],
                e["task_id"],
                e["function_name"],
                output.word(e["status"]),
                output.duration(e.get("execution_time_ms")) if e.get("completed_at") else "-",
                (e.get("requested_at") or "-").replace("T", " ").removesuffix("Z"),
            )
            for e in rows
        ),
    )
    print(text if header else text.split("\n", 1)[-1], flush=True)


def _filters(args: argparse.Namespace) -> str:
    flags = [("--task", args.task_id), ("--function", args.function), ("--status", args.status)]
    text = "".join(f" {flag} {value}" for flag, value in flags if value)
    return text + (" --oldest-first" if args.oldest_first else "")


async def tasks(client: Client, args: argparse.Namespace, session: Session) -> int:
    """`spear tasks`: list the registered tasks and their functions."""
    found = await client.tasks()
    if session.json:
        show_json(found)
    elif not found:
        say("no tasks: no worker has announced one yet")
    else:
        rows = [
            (
                task["task_id"],
                fn["name"],
                output.parameters(fn),
                ("(stream) " if fn.get("streaming") else "") + fn.get("description", ""),
            )
            for task in found
            for fn in task.get("functions", [])
        ]
        print(output.table(("TASK", "FUNCTION", "PARAMETERS", "DESCRIPTION"), rows), flush=True)
    return outcomes.OK


async def workers(client: Client, args: argparse.Namespace, session: Session) -> int:
    """`spear workers`: list the running workers and what they run."""
    found = await client.workers()
    if session.json:
        show_json(found)
    elif not found:
        say("no workers answer")
    else:
        rows = [
            (
                w["worker_id"],
                ",".join(w.get("tasks", [])) or "-",
                w.get("version", ""),
                " ".join(w.get("running_executions", [])) or "-",
            )
            for w in found
        ]
        print(output.table(("WORKER", "TASKS", "VERSION", "RUNNING"), rows), flush=True)
    return outcomes.OK


_COMMANDS = {
    "invoke": invoke,
    "status": status,
    "watch": watch,
    "cancel": cancel,
    "executions": executions,
    "tasks": tasks,
    "workers": workers,
}
