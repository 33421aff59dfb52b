"""A cheaper drop-in for nats-py's protocol parser, with the same results.

nats-py 2.16 reads what the server sends in `nats.protocol.parser.Parser.parse`: for every message
it tries `MSG_RE` and then `HMSG_RE` (nats-py's loose patterns), fills a dict, deletes the control
line from its bytearray, copies the header block and the payload out of it (twice each: a
bytearray slice, then `bytes`), deletes them too, and goes round again. It is the largest single
item in the profile of every spear process: about a quarter of a projection rebuild's CPU.

This `parse` does the same with offsets into one `bytes` copy of what has arrived: a message's
control line is matched by one strict pattern (single spaces, as servers write it), header block
and payload are single slices, and the buffer keeps only the unconsumed tail, once per read.
Anything else (`+OK`, `PING`, `PONG`, `-ERR`, `INFO`, a line the strict pattern refuses) goes
through nats-py's own patterns in nats-py's order, so odd input gets nats-py's answer.

`install()` puts it in place of `Parser.parse` on nats-py's class, so every client of the process
uses it, those already connected too. Between two reads it leaves the state nats-py's parser
leaves (`buf`, `state`, and `needed`, `header_needed`, `msg_arg` of a message whose payload has not
all arrived): `reset()` on reconnect, and a parse that began before `install()`, stay correct.
`tests/test_wireparser.py` checks that both make the same calls, keep the same state and raise
the same errors on random traffic cut anywhere. Should nats-py change its parser, `install()` is a
no-op.

One difference, on purpose: a subject or reply subject that is not UTF-8 (the server passes on
what any client publishes) is handed over with each bad byte replaced by U+FFFD. nats-py decodes
both strictly after the parse, inside the read loop: one such message ended it, and the process
(a gateway, a worker) read nothing more. Replaced, the message reaches its subscriber as what it
is, junk on a subject nobody serves (a reply to it goes nowhere).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from nats.errors import ProtocolError
from nats.protocol import parser as nats_parser

# nats-py 2.16's patterns without their `\A` (a match at an offset is anchored there anyway).
_MSG = re.compile(rb"MSG\s+([^\s]+)\s+([^\s]+)\s+(([^\s]+)[^\S\r\n]+)?(\d+)\r\n")
_HMSG = re.compile(rb"HMSG\s+([^\s]+)\s+([^\s]+)\s+(([^\s]+)[^\S\r\n]+)?([\d]+)\s+(\d+)\r\n")
_OK = re.compile(rb"\+OK\s*\r\n")
_ERR = re.compile(rb"-ERR\s+('.+')?\r\n")
_PING = re.compile(rb"PING\s*\r\n")
_PONG = re.compile(rb"PONG\s*\r\n")
_INFO = re.compile(rb"INFO\s+([^\r\n]+)\r\n")

# The lines a server writes: where these match, nats-py's patterns find the same fields (tested),
# except one case, `HMSG` without a reply subject followed by bytes that let nats-py's pattern read
# on into the next line (`_MAY_READ_ON`); such a line goes nats-py's way.
_FAST_HMSG = re.compile(rb"HMSG (\S+) (\d+) (?:(\S+) )?(\d+) (\d+)\r\n")
_FAST_MSG = re.compile(rb"MSG (\S+) (\d+) (?:(\S+) )?(\d+)\r\n")
_MAY_READ_ON = frozenset(b"0123456789 \t\n\r\f\v")

CONTROL_LINE, PAYLOAD, MAX_CONTROL_LINE = 1, 2, 4096  # nats-py's states and limit
_H, _M = ord("H"), ord("M")

ParseFn = Callable[[Any, bytes], Coroutine[Any, Any, None]]
_Parser: Any = getattr(nats_parser, "Parser", None)
_original: ParseFn | None = getattr(_Parser, "parse", None)


def _same_as_nats() -> bool:
    """Whether nats-py's parser is still the one this module mirrors (its patterns and states)."""
    names = ("MSG_RE", "HMSG_RE", "OK_RE", "ERR_RE", "PING_RE", "PONG_RE", "INFO_RE")
    theirs = [getattr(getattr(nats_parser, name, b""), "pattern", b"") for name in names]
    theirs = [t.replace(b"\r", rb"\r").replace(b"\n", rb"\n") for t in theirs]  # they write CR LF as is
    ours = [b"\\A" + p.pattern for p in (_MSG, _HMSG, _OK, _ERR, _PING, _PONG, _INFO)]
    limits = [
        getattr(nats_parser, n, None)
        for n in ("AWAITING_CONTROL_LINE", "AWAITING_MSG_PAYLOAD", "MAX_CONTROL_LINE_SIZE")
    ]
    return _original is not None and theirs == ours and limits == [CONTROL_LINE, PAYLOAD, MAX_CONTROL_LINE]


Line = tuple[int, bytes, int, bytes, int, int]  # end, subject, sid, reply, header size, size


def _message_line(data: bytes, pos: int) -> Line | None:
    """The `MSG`/`HMSG` line at `pos`, or None if there is none (or not all of it yet)."""
    first = data[pos]
    m = _FAST_HMSG.match(data, pos) if first == _H else _FAST_MSG.match(data, pos) if first == _M else None
    if m is None or (first == _H and m[3] is None and m.end() < len(data) and data[m.end()] in _MAY_READ_ON):
        return _loose_message_line(data, pos)
    hsize, size = (int(m[4]), int(m[5])) if first == _H else (0, int(m[4]))
    return m.end(), m[1], int(m[2]), m[3] or b"", hsize, size


def _loose_message_line(data: bytes, pos: int) -> Line | None:
    """A `MSG`/`HMSG` line read nats-py's way (the same fields, errors and misreadings)."""
    m = _MSG.match(data, pos)
    if m is not None:
        subject, sid, _, reply, size = m.groups()
        hsize = b"0"
    else:
        m = _HMSG.match(data, pos)
        if m is None:
            return None
        subject, sid, _, reply, hsize, size = m.groups()
    try:
        return m.end(), subject, int(sid), reply or b"", int(hsize), int(size)
    except Exception:
        raise ProtocolError("nats: malformed MSG") from None


def utf8(token: bytes) -> bytes:
    """`token` if it is UTF-8 (nearly always ASCII: checked first, in C), else with each bad byte
    replaced by U+FFFD (see the module's docstring)."""
    if token.isascii():
        return token
    try:
        token.decode()
    except UnicodeDecodeError:
        return token.decode("utf-8", "replace").encode()
    return token


def _pending_message(self: Any, data: bytes) -> tuple[int, tuple[int, bytes, bytes, bytes, bytes | None]] | None:
    """The message whose line an earlier read held, if `data` now holds its payload: where the next
    line starts, and the arguments of `_process_msg`."""
    size, hsize, arg = self.needed, self.header_needed, self.msg_arg
    if len(data) < size + 2:
        return None
    self.state, self.header_needed = CONTROL_LINE, 0
    return size + 2, (arg["sid"], utf8(arg["subject"]), utf8(arg["reply"]), data[hsize:size], data[:hsize] or None)


async def _control_line(nc: Any, data: bytes, pos: int) -> int | None:
    """Any other line, nats-py's way: dispatched to the client, and where the next line starts;
    None if the line is cut short; `ProtocolError` if it is none of the protocol's. (nats-py
    drops a `PING` or `PONG` line before it dispatches it, an `-ERR` or `INFO` line after: should
    the client's method raise, the read loop ends and the buffer no longer matters.)"""
    if m := _OK.match(data, pos):
        pass
    elif m := _ERR.match(data, pos):
        await nc._process_err(m[1].decode().lower())
    elif m := _PING.match(data, pos):
        await nc._process_ping()
    elif m := _PONG.match(data, pos):
        await nc._process_pong()
    elif m := _INFO.match(data, pos):
        await nc._process_info(json.loads(m[1].decode()))
    elif len(data) - pos < MAX_CONTROL_LINE and data.find(b"\r\n", pos) >= 0:
        raise ProtocolError("nats: unknown protocol")
    else:
        return None
    return m.end()


def _arrived(buf: bytearray, data: bytes) -> bytes:
    """What to parse: the tail an earlier read left in `buf` (taken out) and the new bytes."""
    if not buf:
        return bytes(data)
    buf += data
    whole = bytes(buf)
    buf.clear()
    return whole


async def parse(self: Any, data: bytes = b"") -> None:
    """Parse what arrived and dispatch it to the client (`self.nc`), as nats-py's `Parser.parse`."""
    buf: bytearray = self.buf
    if self.state == PAYLOAD and len(buf) + len(data) < self.needed + 2:
        # A large payload still arriving: kept as it comes, not copied whole again with each read
        # (that was quadratic: reading a state of 8 MB took 1.1 s, of 2 MB 0.05: probe28).
        buf += data
        return
    data = _arrived(buf, data)
    nc, end, pos = self.nc, len(data), 0
    try:
        if self.state == PAYLOAD:  # a message whose control line came in an earlier read
            if (pending := _pending_message(self, data)) is None:
                return
            pos = pending[0]
            await nc._process_msg(*pending[1])
        # After each await: if the client reset the parser (it is reconnecting), the rest is void.
        while pos < end and self.buf is buf:
            m = _FAST_HMSG.match(data, pos)
            if m is not None and m[3] is not None:  # the usual: a JetStream delivery (ack subject as reply)
                start, subject, sid, reply, hsize, size = m.end(), m[1], int(m[2]), m[3], int(m[4]), int(m[5])
            elif line := _message_line(data, pos):
                start, subject, sid, reply, hsize, size = line
            else:
                if (after := await _control_line(nc, data, pos)) is None:
                    return  # a line cut short: the next read brings the rest
                pos = after
                continue
            if end - start < size + 2:  # the payload has not all arrived: keep its line's fields
                self.msg_arg.update(subject=subject, sid=sid, reply=reply)
                self.needed, self.header_needed, self.state, pos = size, hsize, PAYLOAD, start
                return
            pos = start + size + 2
            hdr = data[start : start + hsize] if hsize else None
            await nc._process_msg(sid, utf8(subject), utf8(reply), data[start + hsize : start + size], hdr)
    finally:
        if pos < end:  # (into a buffer the client has dropped, if it reset the parser)
            buf += data[pos:]


def install() -> None:
    """Use this parser in every nats-py client of the process (a no-op if nats-py's parser is no
    longer the one it mirrors)."""
    if _same_as_nats():
        _Parser.parse = parse


def original() -> ParseFn | None:
    """nats-py's own `Parser.parse` (for the equivalence test), or None."""
    return _original
