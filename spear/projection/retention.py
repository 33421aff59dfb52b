"""Retention: executions that ended more than `async_execution.status_retention_hours` ago are
removed, events and state, leaving a small `expired` marker so a status query can say the
execution expired rather than that it never existed. Executions still running never expire.

The sweep runs beside the projection. It is idempotent, so several projections may sweep.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import msgspec
from nats.aio.client import Client
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from spear.core import contract
from spear.core.config import Settings
from spear.core.eventstore import StoreUnavailable
from spear.core.names import Names
from spear.core.state import ExecutionState
from spear.jetstream import directget, topology
from spear.jetstream.errors import UNREACHABLE
from spear.service import views

log = logging.getLogger(__name__)

NOT_ANSWERED: tuple[type[Exception], ...] = (StoreUnavailable, TimeoutError, *UNREACHABLE)  # NATS down, or stalled

WHOLE_SECONDS = len("2026-01-01T00:00:00")  # the part of an RFC 3339 UTC time that sorts as text
MARKER_KEEP_FACTOR = 7  # markers outlive their executions by 7 retention periods, then go too


class Expired(msgspec.Struct):
    """The marker an expired execution leaves: how and when it ended and expired."""

    execution_id: str
    status: str
    completed_at: str | None
    expired_at: str
    removed_by: str = ""  # "" (markers before it): the retention sweep; else what removed it early
    requested_seq: int = 0  # where its `requested` was stored (0: not known): a list cursor naming it goes on there
    # the `status_retention_hours` of the process that wrote it (0: markers before it, not known):
    # a status read quotes this, not its own setting, which may differ (`spear api` apart)
    retention_hours: float = 0


TASK_CLEANUP = "delete_task"  # `removed_by` of the executions `cleanup_executions` removes


class Retention:
    """The sweep that removes executions ended longer ago than the retention period."""

    def __init__(self, nc: Client, kv: KeyValue, settings: Settings):
        self.nc = nc
        self.kv = kv
        self.names = Names(settings.subject_prefix)
        self.retention_hours = settings.async_execution.status_retention_hours
        self.retention_s = self.retention_hours * 3600
        self.timeout = settings.nats.request_timeout_ms / 1000
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweep every `interval_s` from now on."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Stop sweeping."""
        if self._task:
            self._task.cancel()

    @property
    def marker_ttl_s(self) -> int:
        """Whole seconds, at least one: the granularity of JetStream's per-message TTL."""
        return max(1, math.ceil(MARKER_KEEP_FACTOR * self.retention_s))

    @property
    def interval_s(self) -> float:
        """Seconds between sweeps: a quarter of the retention, within 0.2 to 60 s."""
        return max(0.2, min(60.0, self.retention_s / 4))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except NOT_ANSWERED as exc:
                if self.nc.is_closed:
                    return  # closed for good (its projection is gone): nothing more to sweep
                # (NATS not answering: said in a line, as the other components say it; probe27)
                log.warning("retention: sweep not done (%s); trying again in %.1f s", exc, self.interval_s)
            except Exception:
                if self.nc.is_closed:
                    return
                log.exception("retention: sweep failed; trying again in %.1f s", self.interval_s)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Remove every execution that ended before `now - retention`; return their ids.

        The bucket keeps one value per key, in the order they were written, and an execution's
        state is written after it ends: once a value written after the cutoff (to the second) is
        reached, no later one can be of an execution that ended before it. So a sweep reads the
        old end of the bucket, one state at a time: neither its time nor its memory grows with the
        executions kept. (After `spear projection --rebuild` every state is written anew, so the
        executions ended before it are kept up to one more retention period.)"""
        cutoff = (time.time() if now is None else now) - self.retention_s
        newest = contract.format_timestamp(cutoff)[:WHOLE_SECONDS]
        bucket = self.names.state_bucket
        expired = []
        async for msg in directget.read_all(self.nc, f"KV_{bucket}", f"$KV.{bucket}.exec.>", 0, self.timeout):
            if msg.headers.get("Nats-Time-Stamp", "")[:WHOLE_SECONDS] > newest:
                break
            state = views.state_of(msg)
            if state is None or not state.terminal:
                continue
            completed_at = contract.timestamp_or_none(state.completed_at)
            if completed_at is not None and completed_at < cutoff:
                await self._expire(state)
                expired.append(state.execution_id)
        if expired:
            log.info("retention: %d executions expired", len(expired))
        return expired

    async def _expire(self, state: ExecutionState) -> None:
        await expire(
            self.nc, self.names, self.kv, state, self.marker_ttl_s, self.timeout, retention_hours=self.retention_hours
        )


def marker_ttl_s(settings: Settings) -> int:
    """How long an expired marker stays: whole seconds, at least one (JetStream's TTL granularity)."""
    return max(1, math.ceil(MARKER_KEEP_FACTOR * settings.async_execution.status_retention_hours * 3600))


async def expire(
    nc: Client,
    names: Names,
    kv: KeyValue,
    state: ExecutionState,
    ttl_s: int,
    timeout: float,
    removed_by: str = "",
    *,
    retention_hours: float = 0,
) -> None:
    """Remove one ended execution's events and state, leaving its expired marker (also used by
    delete_task's `cleanup_executions`, named by `removed_by`). `retention_hours` is the retention
    in force where it is written (0: not said), which the marker carries for status to quote."""
    requested = await directget.newest(nc, names.stream, names.event("*", state.execution_id, "requested"), timeout)
    marker = Expired(
        execution_id=state.execution_id,
        status=state.status,
        completed_at=state.completed_at,
        expired_at=contract.format_timestamp(time.time()),
        removed_by=removed_by,
        requested_seq=requested.seq if requested is not None else 0,
        retention_hours=retention_hours,
    )
    # The marker first: at no moment is the execution neither there nor known to have expired.
    # It carries its own time to live (the bucket allows per-message TTLs), so markers do not
    # pile up: the server removes each MARKER_KEEP_FACTOR retention periods after it was written.
    # (A put with a TTL: nats-py's `kv.put` takes none.)
    await nc.jetstream().publish(
        f"$KV.{names.state_bucket}.{names.expired_key(state.execution_id)}",
        msgspec.json.encode(marker),
        timeout=timeout,
        msg_ttl=ttl_s,
    )
    await topology.api_request(
        nc, f"STREAM.PURGE.{names.stream}", {"filter": names.execution_events(state.execution_id)}, timeout
    )
    await kv.purge(names.state_key(state.execution_id))


async def expired_marker(kv: KeyValue, names: Names, execution_id: str) -> Expired | None:
    """The marker of an expired execution, if it expired."""
    try:
        entry = await kv.get(names.expired_key(execution_id))
    except (KeyNotFoundError, KeyDeletedError):
        return None
    return msgspec.json.decode(entry.value or b"", type=Expired)
