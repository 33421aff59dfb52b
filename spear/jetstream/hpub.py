"""A cheaper drop-in for nats-py's `Client._send_publish`, with the same bytes on the wire.

nats-py 2.16 builds every message with headers in `_send_publish`: for each header it strips the
name, checks it with a regular expression, encodes it, strips and translates the value (CR and LF
become spaces), encodes it, and extends a bytearray five times; then the `HPUB` line is formatted
and encoded and the parts are added up. A stored event carries six to eight headers, so that is
~25 bytearray extends and ~12 µs a message, a tenth of an inline SYNC call's CPU in the gateway.

This `_send_publish` checks each header *name* once per process (they are spear's own few; the
outcome is remembered: `Name: ` as text, or "skip" for a name that strips to nothing), makes the
value what nats-py makes of it (stripped; CR and LF, when there are any, turned into spaces),
joins the header block as one string and encodes it once. Errors are nats-py's, in nats-py's
order: a refused name raises `BadHeaderError`, a value that is not text its `AttributeError` or
`TypeError`, each after a value before it that cannot be encoded has raised its
`UnicodeEncodeError` (nats-py encodes as it goes). The rest is nats-py's, inline: the counters,
the pending buffer and its size limit, and the wake-up of the flusher.

`install()` puts it in place of `Client._send_publish`, so every publish of the process goes
through it (nats-py's own `request`, JetStream and KV calls too). It is a no-op if nats-py's method
no longer looks like the one this mirrors. `tests/test_hpub.py` checks that both put the same
bytes in the pending buffer, leave the same counters and raise the same errors on any input.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from nats import errors
from nats.aio import client as nats_client
from nats.aio.client import Client

SendFn = Callable[..., Coroutine[Any, Any, None]]

_original: SendFn | None = getattr(Client, "_send_publish", None)
_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py 2.16's `_HEADER_KEY_RE`
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})  # nats-py 2.16's `_HEADER_VALUE_NEWLINES`
_MAX_NAMES = 1024  # names remembered; a process that publishes ever new ones checks the rest each time
_names: dict[str, str] = {}  # a header name as given -> "Name: " on the wire, or "" (an empty name: skipped)


def _name(key: str) -> str:
    """`key` as its header line starts (`Name: `), "" for a name nats-py skips; or nats-py's
    error for a name it refuses."""
    name = key.strip()
    if name and not _KEY.fullmatch(name):
        raise errors.BadHeaderError(name)
    start = f"{name}: " if name else ""
    if len(_names) < _MAX_NAMES:
        _names[key] = start
    return start


def header_block(headers: Mapping[str, Any]) -> bytes:
    """The header block nats-py writes for `headers` (`NATS/1.0`, a line each, an empty line)."""
    parts = ["NATS/1.0\r\n"]
    try:
        for key, value in headers.items():
            start = _names.get(key)
            if start is None:
                start = _name(key)
            if not start:
                continue
            text = value.strip()
            if "\r" in text or "\n" in text:
                text = text.translate(_NEWLINES)
            parts += (start, text, "\r\n")
    except Exception:
        "".join(parts).encode()  # nats-py encodes as it goes: a value before that it cannot encode fails first
        raise
    parts.append("\r\n")
    return "".join(parts).encode()


async def send_publish(
    self: Client, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
) -> None:
    """nats-py's `Client._send_publish`, with the header block made by `header_block`."""
    if subject == "":
        raise errors.BadSubjectError
    if _queued(self, _command(subject, reply, payload, headers), 1, payload_size):
        await self._flush_pending(force_flush=True)
    if self._flush_queue is not None and self._flush_queue.empty():
        await self._flush_pending()


def _command(subject: str, reply: str, payload: bytes, headers: Mapping[str, Any] | None) -> bytes:
    """The protocol bytes nats-py writes for a message: `PUB`, or `HPUB` with the header block."""
    if headers is None:
        return f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n"
    block = header_block(headers)
    size = len(block)
    return f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode() + block + payload + b"\r\n"


def _queued(nc: Client, cmd: bytes, messages: int, payload_bytes: int) -> bool:
    """Count `messages` and append their `cmd` to the pending buffer: nats-py's counters and its
    `_send_command`, inline (one coroutine less per message). True if the buffer is over its
    limit (then nats-py flushes at once, before waking the flusher)."""
    stats = nc.stats
    stats["out_msgs"] += messages
    stats["out_bytes"] += payload_bytes
    nc._pending.append(cmd)
    nc._pending_data_size += len(cmd)
    return nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size


async def publish_many(nc: Client, subjects: Sequence[str], payload: bytes) -> None:
    """Publish `payload` (no reply, no headers) to each of `subjects` in one go: the bytes and
    counters awaiting `nc.publish` for each leaves, with one pending-buffer append and one flusher
    wake-up for all. All or nothing: nats-py's checks (subject, connection state, buffer while
    disconnected, size), in nats-py's order, pass for every message before any is queued. For
    the acknowledgements of a batch of deliveries, one message per event (explicit ack policy).
    Where nats-py's publishing is no longer the one this mirrors, each goes through `nc.publish`."""
    if not _same_as_nats():
        for subject in subjects:
            await nc.publish(subject, payload)
        return
    size = len(payload)
    pending = nc._pending_data_size
    commands = []
    for subject in subjects:
        _check(nc, subject, "", size, pending)
        command = f"PUB {subject}  {size}\r\n".encode() + payload + b"\r\n"  # nats-py's `pub_cmd`, no reply
        commands.append(command)
        pending += len(command)
    if not commands:
        return
    if _queued(nc, b"".join(commands), len(commands), size * len(commands)):
        await nc._flush_pending(force_flush=True)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def publish_now(
    nc: Client, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
) -> bool:
    """`nc.publish` without awaiting, for callbacks on the read loop (an ASYNC call accepted
    without a task: `Gateway`): nats-py's checks and errors, the same bytes queued, the flusher
    woken. Unlike `publish` it never waits for a flush: see `crowded`. False, with nothing
    queued, where nats-py's publishing is no longer the one this mirrors."""
    if not _same_as_nats():
        return False
    _check(nc, subject, reply, len(payload), nc._pending_data_size)
    _queued(
        nc, _command(subject, reply, payload, headers), 1, len(payload)
    )  # (over the buffer's limit, nats-py waits for the flush: no callback can)
    if nc._flusher_task is None or nc._flusher_task.done():
        asyncio.get_running_loop().create_task(nc._flush_pending())  # nats-py then writes at once itself
    elif nc._flush_queue is not None and nc._flush_queue.empty() and nc.is_connected:
        nc._flush_queue.put_nowait(asyncio.get_running_loop().create_future())  # kick the flusher
    return True


def crowded(nc: Client) -> bool:
    """Whether the pending buffer is over the size at which nats-py makes a publisher wait for
    the flush: callers of `publish_now`, which cannot wait, should take the awaited way then."""
    return nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size


def _check(nc: Client, subject: str, reply: str, size: int, pending: int) -> None:
    """nats-py's checks before it publishes, in its order, with its errors."""
    if not nc._skip_subject_validation:
        nats_client._validate_subject(subject)  # whitespace or CR/LF would inject protocol lines
        if reply:
            nats_client._validate_subject(reply)
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise errors.ConnectionDrainingError
    if not nc.is_connected and (nc._max_pending_size <= 0 or size + pending > nc._max_pending_size):
        raise errors.OutboundBufferLimitError
    if size > nc._max_payload:
        raise errors.MaxPayloadError


@functools.cache
def _same_as_nats() -> bool:
    """Whether nats-py's publishing is still the one this module mirrors."""
    key = getattr(nats_client, "_HEADER_KEY_RE", None)
    newlines = getattr(nats_client, "_HEADER_VALUE_NEWLINES", None)
    return (
        _original is not None
        and getattr(key, "pattern", None) == _KEY.pattern
        and newlines == _NEWLINES
        and bytes(getattr(nats_client, "NATS_HDR_LINE", b"")) == b"NATS/1.0"
        and callable(getattr(Client, "_send_command", None))
        and callable(getattr(Client, "_flush_pending", None))
        and hasattr(Client(), "_skip_subject_validation")
        and hasattr(Client(), "_flusher_task")
    )


def install() -> None:
    """Use this `_send_publish` in every nats-py client of the process (a no-op if nats-py's
    publishing is no longer the one it mirrors)."""
    if _same_as_nats():
        Client._send_publish = send_publish  # type: ignore[method-assign]


def original() -> SendFn | None:
    """nats-py's own `_send_publish` (for the equivalence test), or None."""
    return _original
