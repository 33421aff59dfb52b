"""Apply the JetStream topology kept as data in `streams/` (JetStream API JSON), idempotently.

Each file is the config the JetStream API takes, with `${PREFIX}`-style names substituted.
A missing stream or consumer is created, one whose config differs is updated, an equal one is
left alone, so every component can apply the topology at start-up.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats.errors
from nats.aio.client import Client

from spear.aio import DeadlinePassed, poll_until
from spear.core.names import Names
from spear.jetstream.errors import TEMPORARILY_UNAVAILABLE

log = logging.getLogger(__name__)
START_UP_DEADLINE_S = 60.0
RETRYABLE_API_ERRORS = {TEMPORARILY_UNAVAILABLE}  # a cluster electing leaders
NO_SUITABLE_PEERS = 10005  # a replicated stream needs more peers than have joined the cluster (yet)
REPLICAS_NEED_A_CLUSTER = 10074  # "replicas > 1 not supported in non-clustered mode": waiting cannot help


def _streams_dir() -> Traversable:
    """`streams/` sits at the project's top level and ships in the wheel as the package data of
    `spear.streams` (a setuptools package-dir mapping). Run from a source checkout, where `spear`
    is imported from the working directory, the folder beside the package is the same data."""
    try:
        return resources.files("spear.streams")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "streams"


STREAMS = _streams_dir()


class JetStreamApiError(Exception):
    """An error reply of the JetStream API (`code`, `err_code`, description)."""

    def __init__(self, code: int, err_code: int, description: str):
        super().__init__(f"JetStream API error {code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code


class StartUpFailed(RuntimeError):
    """The NATS a component connected to cannot hold spear's streams: said in one line, exit 69."""


class NotEnoughPeers(StartUpFailed):
    """The cluster never offered as many JetStream peers as `nats.stream_replicas` asks for."""


class NoJetStream(StartUpFailed):
    """JetStream is off on the NATS, or for this account."""


class JetStreamUnanswered(StartUpFailed):
    """JetStream's API never answered in time (a cluster without a quorum, say)."""


# JetStream's answers when it is off for the account, or off on the server
NOT_ENABLED_ERRORS = (10039, 10076)
WARN_AFTER_S = 2.0  # no JetStream this long at start-up: say what is likely wrong, and keep waiting


def load_config(filename: str, names: Names, **extra: str) -> dict[str, Any]:
    """A topology file with the prefix's names (and `extra` values) filled in."""
    text = (STREAMS / filename).read_text()
    values = {
        "PREFIX": names.prefix,
        "STREAM": names.stream,
        "STATE_BUCKET": names.state_bucket,
        "TASKS_BUCKET": names.tasks_bucket,
        "PROJECTION_CONSUMER": names.projection_consumer,
        "REGISTRY_STREAM": names.registry_stream,
        **extra,
    }
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    config: dict[str, Any] = json.loads(text)
    return config


async def api_request(nc: Client, subject: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """One JetStream API request; JetStreamApiError for an error reply."""
    reply = await nc.request(f"$JS.API.{subject}", json.dumps(body).encode() if body else b"", timeout=timeout)
    data: dict[str, Any] = json.loads(reply.data)
    if "error" in data:
        error = data["error"]
        raise JetStreamApiError(error.get("code", 0), error.get("err_code", 0), error.get("description", ""))
    return data


async def subject_count(nc: Client, stream: str, timeout: float) -> int:
    """How many subjects `stream` holds messages on (a KV bucket's stream: its keys, deleted ones
    included). nats-py's StreamState drops the field."""
    info = await api_request(nc, f"STREAM.INFO.{stream}", None, timeout)
    return int(info.get("state", {}).get("num_subjects", 0))


async def wait_for_jetstream(nc: Client, deadline_s: float = 30.0) -> None:
    """Poll with short timeouts: a cluster answers no API call before its leaders are elected.
    A NATS without JetStream (no responders, or "not enabled") is said after WARN_AFTER_S, and is
    NoJetStream at the deadline: start-up was silent for a minute, then a traceback (probe35).
    A JetStream that never answers (a cluster without a quorum) is JetStreamUnanswered."""
    loop = asyncio.get_running_loop()
    began, warned = loop.time(), False

    def worth_waiting(exc: Exception) -> bool:
        nonlocal warned
        if not isinstance(exc, (nats.errors.TimeoutError, nats.errors.NoRespondersError, JetStreamApiError)):
            return False
        if _missing(exc) and not warned and loop.time() - began >= WARN_AFTER_S:
            warned = True
            log.warning(
                "topology: no JetStream at %s (%s): spear needs JetStream enabled on the server "
                "(nats-server -js, or a jetstream block) and for this account; waiting %.0f s for it",
                _server(nc),
                _said(exc),
                deadline_s,
            )
        return True

    try:
        await poll_until(
            lambda: api_request(nc, "INFO", None, timeout=1.0),
            timeout_s=deadline_s,
            interval_s=0.2,
            retry_on=worth_waiting,
        )
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, JetStreamApiError) as exc:
        if _missing(exc):
            raise NoJetStream(
                f"no JetStream at {_server(nc)} after {deadline_s:.0f} s ({_said(exc)}): spear needs JetStream "
                "enabled on the server (nats-server -js, or a jetstream block) and for its account"
            ) from exc
        raise JetStreamUnanswered(
            f"JetStream at {_server(nc)} did not answer within {deadline_s:.0f} s ({_said(exc)}): a cluster "
            "answers once most of its servers are up and have elected a leader"
        ) from exc


def _missing(exc: Exception) -> bool:
    """JetStream is off there, or for the account (not merely slow or electing)."""
    return isinstance(exc, nats.errors.NoRespondersError) or (
        isinstance(exc, JetStreamApiError) and exc.err_code in NOT_ENABLED_ERRORS
    )


def _server(nc: Client) -> str:
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url else "the NATS server"


def _said(exc: Exception) -> str:
    if isinstance(exc, nats.errors.NoRespondersError):
        return "no responders for $JS.API"
    return str(exc) or type(exc).__name__


# Where a consumer starts matters only when it is made: the server refuses to change it after.
_WHERE_IT_STARTS = {"deliver_policy", "opt_start_seq", "opt_start_time"}
_NOT_COMPARED = {"description", *_WHERE_IT_STARTS}


def _differs(wanted: dict[str, Any], actual: dict[str, Any]) -> bool:
    return any(actual.get(key) != value for key, value in wanted.items() if key not in _NOT_COMPARED)


async def ensure_stream(nc: Client, config: dict[str, Any], timeout: float = 10.0) -> None:
    """Create the stream, or update it where its config differs, and wait for its leader."""
    name = config["name"]
    try:
        info = await api_request(nc, f"STREAM.INFO.{name}", None, timeout)
    except JetStreamApiError as exc:
        if exc.err_code != 10059:  # stream not found
            raise
        info = await api_request(nc, f"STREAM.CREATE.{name}", config, timeout)
    else:
        config = _keeping_replicas(config, info["config"])
        if _differs(config, info["config"]):
            info = await api_request(nc, f"STREAM.UPDATE.{name}", {**info["config"], **config}, timeout)
    await _wait_for_leader(nc, name, info, timeout)


def _keeping_replicas(wanted: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """`nats.stream_replicas` applies where a stream or bucket is created: an existing one keeps
    its replicas (probe58: one component started without the setting lowered every R3 stream and
    bucket to R1, silently). A mismatch is said, and changed by an operator (docs/operations.md)."""
    existing = int(actual.get("num_replicas") or 1)
    asked = wanted.get("num_replicas")
    if asked is None or int(asked) == existing:
        return wanted
    log.warning(
        "topology: stream %s has %d replicas, nats.stream_replicas asks for %d: the stream keeps its %d "
        "(replicas are set when a stream is created; change them with `nats stream edit --replicas`)",
        wanted["name"],
        existing,
        asked,
        existing,
    )
    return {**wanted, "num_replicas": existing}


async def _wait_for_leader(nc: Client, name: str, info: dict[str, Any], deadline_s: float) -> None:
    """A replicated stream answers publishes only once its group has elected a leader."""
    if info.get("cluster", {}).get("leader") or info.get("config", {}).get("num_replicas", 1) <= 1:
        return
    await _until_leader(nc, f"STREAM.INFO.{name}", f"stream {name}", deadline_s)


async def _until_leader(nc: Client, info_subject: str, what: str, deadline_s: float) -> None:
    """Poll `info_subject` until its cluster has a leader; a 503 API error if none comes in time
    (which `_patiently` retries: the whole step runs again)."""
    try:
        await poll_until(
            lambda: api_request(nc, info_subject, None, 2.0),
            lambda info: bool(info.get("cluster", {}).get("leader")),
            timeout_s=deadline_s,
            what=f"a leader for {what}",
        )
    except DeadlinePassed:
        raise JetStreamApiError(503, 0, f"{what} has no leader after {deadline_s} s") from None


async def ensure_consumer(
    nc: Client, stream: str, config: dict[str, Any], timeout: float = 10.0, never_lower: tuple[str, ...] = ()
) -> None:
    """Create the consumer, or replace it where its config differs, and wait for its leader. The
    fields `never_lower` names keep an existing consumer's value where it is higher."""
    name = config["durable_name"]
    info = None
    try:
        info = await api_request(nc, f"CONSUMER.INFO.{stream}.{name}", None, timeout)
    except JetStreamApiError as exc:
        if exc.err_code != 10014:  # consumer not found
            raise
    for field in never_lower:
        existing = int(info["config"].get(field, 0)) if info is not None else 0
        if existing > config[field]:
            shown = (
                (existing // 1_000_000, config[field] // 1_000_000, " ms")
                if field == "ack_wait"
                else (existing, config[field], "")
            )
            log.info(
                "consumer %s: its %s of %d%s stays (%d%s was asked for)",
                name,
                field,
                shown[0],
                shown[2],
                shown[1],
                shown[2],
            )
            config = {**config, field: existing}
    if info is not None and _differs(config, info["config"]):
        # Where it starts stays as it was made: the server refuses an update that names another
        # (review44: a projection consumer made after a replay starts at a sequence, and the
        # first config change of an upgrade failed its every start).
        config = {key: value for key, value in config.items() if key not in _WHERE_IT_STARTS}
        config.update({key: value for key, value in info["config"].items() if key in _WHERE_IT_STARTS})
    if info is None or _differs(config, info["config"]):
        request = {"stream_name": stream, "config": config}
        info = await api_request(nc, f"CONSUMER.CREATE.{stream}.{name}", request, timeout)
    # Pull requests sent before a replicated consumer has a leader are lost: wait for it.
    if "cluster" in info and not info["cluster"].get("leader"):
        await _until_leader(nc, f"CONSUMER.INFO.{stream}.{name}", f"consumer {name}", timeout)


async def _patiently(
    apply: Callable[[], Awaitable[None]], nc: Client, replicas: int, deadline_s: float = START_UP_DEADLINE_S
) -> None:
    """Applying the topology is idempotent, so a start-up that meets a busy or electing cluster
    (API timeouts, no leader yet) or one whose peers are still joining (no suitable peers for
    placement) tries again instead of failing; if peers never come, it says so."""
    try:
        await poll_until(apply, timeout_s=deadline_s, interval_s=0.5, retry_on=_worth_retrying)
    except JetStreamApiError as exc:
        if exc.err_code == NO_SUITABLE_PEERS:
            raise await _not_enough_peers(nc, replicas, deadline_s) from exc
        if exc.err_code == REPLICAS_NEED_A_CLUSTER:
            raise NotEnoughPeers(
                f"nats.stream_replicas = {replicas} needs a NATS cluster, but the server at {_server(nc)} "
                "runs alone (`spear up` without --nats-url embeds a single server): set stream_replicas = 1 "
                "or use the cluster with --nats-url"
            ) from exc
        raise


def _worth_retrying(exc: Exception) -> bool:
    if isinstance(exc, JetStreamApiError):
        retry = exc.err_code != REPLICAS_NEED_A_CLUSTER and (
            exc.code in (500, 503) or exc.err_code in (*RETRYABLE_API_ERRORS, NO_SUITABLE_PEERS)
        )
    else:
        retry = isinstance(exc, (nats.errors.TimeoutError, nats.errors.NoRespondersError))
    if retry:
        log.info("topology: %s; trying again", exc)
    return retry


async def cluster_servers(nc: Client) -> list[str] | None:
    """The servers of the cluster as the connected server advertises them now (its INFO's
    `connect_urls`, itself included), or None if it advertises none (standalone, `no_advertise`).

    A fresh INFO is read from a new TCP connection: nats-py does not keep the updates it gets."""
    url = urlparse(nc.connected_url.geturl() if nc.connected_url else "")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port), 2.0)
    except (OSError, TimeoutError):
        return None
    try:
        line = await asyncio.wait_for(reader.readline(), 2.0)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    if not line.startswith(b"INFO "):
        return None
    servers = json.loads(line[5:]).get("connect_urls")
    return sorted(servers) if servers else None


async def wait_for_peers(nc: Client, replicas: int, deadline_s: float = START_UP_DEADLINE_S) -> None:
    """Until the cluster lists at least `replicas` servers: `$JS.API.INFO` answers as soon as a
    meta leader exists, before every peer has joined, and creating a replicated stream then fails
    with "no suitable peers". (Placement is retried too: a server listed is not yet a peer.)"""
    if replicas <= 1:
        return

    def enough(servers: list[str] | None) -> bool:
        if servers is None or len(servers) >= replicas:
            return True
        log.info("topology: %d of %d servers in the cluster; waiting for more", len(servers), replicas)
        return False

    try:
        await poll_until(lambda: cluster_servers(nc), enough, timeout_s=deadline_s, interval_s=0.5, what="peers")
    except DeadlinePassed:
        raise await _not_enough_peers(nc, replicas, deadline_s) from None


async def _not_enough_peers(nc: Client, replicas: int, deadline_s: float) -> NotEnoughPeers:
    servers = await cluster_servers(nc)
    seen = f"{len(servers)} ({', '.join(servers)})" if servers else "not advertised"
    return NotEnoughPeers(
        f"nats.stream_replicas = {replicas} needs {replicas} JetStream peers, but {deadline_s:.0f} s into "
        f"start-up the cluster still cannot place the streams; servers seen in the cluster: {seen}"
    )


async def ensure_base(nc: Client, names: Names, replicas: int = 1, deadline_s: float | None = None) -> None:
    """The executions stream and the read-model buckets: what every component needs (waiting up
    to START_UP_DEADLINE_S, as it is when called, for JetStream and the cluster's peers)."""
    deadline_s = START_UP_DEADLINE_S if deadline_s is None else deadline_s
    await wait_for_jetstream(nc, deadline_s)
    configs = []
    for filename in ("executions.stream.json", "state.kv.json", "tasks.kv.json", "registry.stream.json"):
        config = load_config(filename, names)
        config["num_replicas"] = replicas
        configs.append(config)
    # Peers are waited for only where a stream is to be placed: streams already in place serve on
    # a quorum, and a component restarted while one node of three is down must start (probe36:
    # every restarted worker waited 60 s for the third node, failed, and was restarted, for ever).
    if not await _in_place(nc, configs, deadline_s):
        await wait_for_peers(nc, replicas, deadline_s)
    for config in configs:
        await _patiently(functools.partial(ensure_stream, nc, config), nc, replicas, deadline_s)


async def _in_place(nc: Client, configs: list[dict[str, Any]], deadline_s: float) -> bool:
    """Every stream exists (nothing to place on new peers: an existing stream keeps its replicas)."""

    async def replicas_in_place(config: dict[str, Any]) -> bool:
        try:
            await api_request(nc, f"STREAM.INFO.{config['name']}", None, 2.0)
        except JetStreamApiError as exc:
            if exc.err_code == 10059:  # stream not found
                return False
            raise
        return True

    for config in configs:
        found = await poll_until(
            functools.partial(replicas_in_place, config), timeout_s=deadline_s, interval_s=0.5, retry_on=_worth_retrying
        )
        if not found:
            return False
    return True


async def ensure_worker_consumer(nc: Client, names: Names, task_id: str, ack_wait_ms: int) -> str:
    """The shared pull consumer of a task's workers; its durable name.

    Its `ack_wait` is raised to `ack_wait_ms`, never lowered: the task's workers already running
    send in-progress acks every third of *their* `ack_wait_ms`, so a lower value set by one worker
    would have the others' running invocations redelivered as lost (and run twice). Each worker's
    beats stay within a consumer's `ack_wait` that only ever grows (docs/operations.md)."""
    config = load_config("worker.consumer.json", names, TASK_ID=task_id)
    config["ack_wait"] = ack_wait_ms * 1_000_000
    await _patiently(lambda: ensure_consumer(nc, names.stream, config, never_lower=("ack_wait",)), nc, 1)
    return str(config["durable_name"])


async def ensure_projection_consumer(nc: Client, names: Names, start_seq: int = 0) -> str:
    """The projection's durable consumer over every event (from stream sequence `start_seq` if it
    is made now: after a replay); its name."""
    config = load_config("projection.consumer.json", names)
    if start_seq > 0:
        config = {**config, "deliver_policy": "by_start_sequence", "opt_start_seq": start_seq}
    await _patiently(lambda: ensure_consumer(nc, names.stream, config), nc, 1)
    return str(config["durable_name"])
