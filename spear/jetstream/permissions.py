"""Least-privilege NATS users for spear: one per role, granting only the subjects that role uses.

Pure: builds the `authorization { users: [...] }` block of a nats-server config from the subject
prefix. `deploy/spear-users.conf` is this block for prefix `spear` with passwords from environment
variables (a test keeps it equal), and `spear up --secure` writes it with generated passwords.

Roles:
- client: requests `P.api.*` (not task registration or deletion), `$SRV.*` discovery, and receives
  its replies on `_INBOX.>` and the events on `P.exec.>`, except `requested` ones (they carry the
  request's context: headers and environment). It can write nothing to the log or to JetStream.
- gateway (also the HTTP API): serves `P.api.>`, appends `requested` / `cancel_requested` /
  `cancelled`, follows `P.exec.>`, reads the stream and buckets, watches the task registry.
- worker: pulls its task consumers, appends, acks, publishes its task to the registry.
- projection: pulls its consumer, acks, writes the state bucket, purges expired executions.
- admin: everything (topology changes, `spear projection --rebuild`, the `nats` CLI).

Components get their replies on `_SPEAR_INBOX.>` (connection.py), which clients cannot read, and
reply only to `_INBOX.>` / `_SPEAR_INBOX.>`: a client naming another subject as its reply
(`P.exec.…`, say) gets nothing published there. Subjects a component may write for its own work
(`P.append.>`, `$KV.…`) are kept from its answers by replies.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from spear.core.names import Names

ROLES = ("client", "gateway", "worker", "projection", "admin")
COMPONENT_INBOX = "_SPEAR_INBOX"
CLIENT_INBOX = "_INBOX"

Permissions = dict[str, dict[str, list[str]]]


def role_permissions(names: Names) -> dict[str, Permissions]:
    """The NATS publish and subscribe permissions of each role of spear's parts."""
    p = names.prefix
    stream = names.stream
    state, tasks = f"KV_{names.state_bucket}", f"KV_{names.tasks_bucket}"
    registry = names.registry_stream
    api = "$JS.API"

    def streams_setup(*streams: str) -> list[str]:
        # Every component applies the topology at start-up, idempotently (topology.py): INFO
        # always, CREATE on a fresh server, UPDATE when an upgrade changes a stream's config.
        return [f"{api}.INFO"] + [f"{api}.STREAM.{op}.{s}" for s in streams for op in ("INFO", "CREATE", "UPDATE")]

    def direct_get(*streams: str) -> list[str]:
        return [subject for s in streams for subject in (f"{api}.DIRECT.GET.{s}", f"{api}.DIRECT.GET.{s}.>")]

    def fresh_get(*streams: str) -> list[str]:
        # reads answered by the leader, where a stream is replicated (jetstream/leaderget.py)
        return [f"{api}.STREAM.MSG.GET.{s}" for s in streams]

    def pull(consumer: str) -> list[str]:
        return [
            f"{api}.CONSUMER.INFO.{stream}.{consumer}",
            f"{api}.CONSUMER.CREATE.{stream}.{consumer}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>",
        ]

    replies = [f"{CLIENT_INBOX}.>", f"{COMPONENT_INBOX}.>"]  # components answer requests only there
    component_subscribe = [f"{COMPONENT_INBOX}.>", "$SRV.>"]  # own replies; micro PING/INFO/STATS
    base = streams_setup(stream, state, tasks, registry)
    return {
        "client": {
            "publish": {
                "allow": [f"{p}.api.>", "$SRV.>"],
                "deny": [f"{p}.api.register_task", f"{p}.api.delete_task"],
            },
            "subscribe": {
                "allow": [f"{CLIENT_INBOX}.>", f"{p}.exec.>", f"{p}.tasks.>"],
                "deny": [f"{p}.exec.*.*.requested"],
            },
        },
        "gateway": {
            "publish": {
                "allow": [
                    *replies,
                    f"{p}.append.>",
                    *base,
                    *direct_get(stream, state),
                    *fresh_get(stream),
                    f"{api}.CONSUMER.INFO.{stream}.*",  # admission: the worker consumers' backlog
                    # SYNC completions: an ordered consumer of the terminal events, made anew
                    # after a gap; flow control replies under load
                    f"{api}.CONSUMER.CREATE.{stream}",
                    f"$JS.FC.{stream}.>",
                    # the task registry watch: an ordered consumer on the tasks bucket, made anew
                    # (and the old one deleted) after a gap; flow control replies under load
                    f"{api}.CONSUMER.CREATE.{tasks}",
                    f"{api}.CONSUMER.INFO.{tasks}.*",
                    f"{api}.CONSUMER.DELETE.{tasks}.*",
                    f"$JS.FC.{tasks}.>",
                    "$SRV.>",  # health and list_workers: PING and INFO of the other components
                    names.projection_status,  # health: the projection's progress, stalls, poison
                    f"{p}.append_task.>",  # register_task / delete_task: the registry's events
                    *direct_get(registry),  # following the registry
                    f"{p}.worker.tasks",  # get_task: which workers serve a task, its instances
                    # delete_task with cleanup_executions: expired markers, purged history
                    f"{api}.STREAM.PURGE.{stream}",
                    f"$KV.{names.state_bucket}.>",
                ]
            },
            "subscribe": {"allow": [*component_subscribe, f"{p}.api.>", f"{p}.exec.>", f"{p}.tasks.>"]},
        },
        "worker": {
            "publish": {
                "allow": [
                    *replies,
                    f"{p}.append.>",
                    *base,
                    *direct_get(stream),  # an invocation's history, on redelivery
                    *fresh_get(stream),
                    *pull("*"),  # one consumer per task: worker-<task_id>
                    f"$KV.{names.tasks_bucket}.>",
                    *direct_get(tasks),  # its code tasks' entries, kept to a definition served (worker.py)
                    *direct_get(registry),  # following the registry: tasks registered at runtime
                    f"{p}.worker.functions",  # which other worker has a function its release lacks
                ]
            },
            "subscribe": {
                "allow": [
                    *component_subscribe,
                    f"{p}.exec.*.*.cancel_requested",
                    f"{p}.exec.*.*.cancelled",  # its invocation is not run before a read (firsts.py)
                    f"{p}.tasks.>",
                    f"{p}.worker.tasks",
                    f"{p}.worker.functions",
                ]
            },
        },
        "projection": {
            "publish": {
                "allow": [
                    *replies,
                    *base,
                    *direct_get(state),
                    # an execution's history, for an event that finds no state (another projection
                    # on the consumer has not written its `requested` yet)
                    *direct_get(stream),
                    *fresh_get(stream),
                    *pull(names.projection_consumer),
                    # a replay (first start, --rebuild): an ephemeral push consumer, flow-controlled
                    f"{api}.CONSUMER.CREATE.{stream}",
                    f"$JS.FC.{stream}.>",
                    f"{api}.CONSUMER.DELETE.{stream}.{names.projection_consumer}",  # --rebuild
                    f"{api}.STREAM.PURGE.{stream}",  # retention: an expired execution's events
                    f"{api}.STREAM.PURGE.{state}",  # --rebuild
                    f"$KV.{names.state_bucket}.>",
                ]
            },
            "subscribe": {"allow": [*component_subscribe, names.projection_status]},
        },
        "admin": {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}},
    }


def authorization_block(names: Names, passwords: Mapping[str, str], from_environment: bool = False) -> str:
    """The nats-server `authorization` block: one user per role, named after it. With
    `from_environment`, each password is the variable named in `passwords` (`$VAR`, resolved
    by nats-server from its environment) instead of a literal."""
    users = []
    for role, permissions in role_permissions(names).items():
        password = f"${passwords[role]}" if from_environment else json.dumps(passwords[role])
        users.append(
            f"    {{\n      user: {json.dumps(role)}\n      password: {password}\n"
            f"      permissions: {_permissions_text(permissions)}\n    }}"
        )
    return "authorization {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"


def _permissions_text(permissions: Permissions) -> str:
    lines = ["{"]
    for direction, rules in permissions.items():
        lines.append(f"        {direction}: {{")
        for kind, subjects in rules.items():
            lines.append(f"          {kind}: [")
            lines += [f"            {json.dumps(subject)}" for subject in subjects]
            lines.append("          ]")
        lines.append("        }")
    lines.append("      }")
    return "\n".join(lines)


def environment_variable(role: str) -> str:
    """The variable that holds a role's password in deploy/spear-users.conf."""
    return f"SPEAR_NATS_{role.upper()}_PASSWORD"


DEPLOY_HEADER = """\
# spear's NATS users, one per role, least privilege, for the subject prefix `{prefix}`: made by
# `spear nats-users` (spear/jetstream/permissions.py; tests/test_permissions.py keeps
# deploy/spear-users.conf equal to it and runs a nats-server that enforces it). Passwords come
# from nats-server's environment: {variables}.
# For another prefix: SPEAR_SUBJECT_PREFIX=acme spear nats-users > spear-users.conf
"""


def users_file(names: Names) -> str:
    """The users file of deploy/: the authorization block with passwords from the environment."""
    variables = {role: environment_variable(role) for role in ROLES}
    header = DEPLOY_HEADER.format(prefix=names.prefix, variables=", ".join(variables.values()))
    return header + authorization_block(names, variables, from_environment=True)
