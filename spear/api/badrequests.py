"""A malformed HTTP request is the client's problem, not the server's: one debug line, no
traceback, and the contract's JSON error body.

aiohttp answers such a request by itself, before any handler or middleware sees it, then logs it
on `aiohttp.server` with the parser's whole traceback, at ERROR for some (a duplicate
`Content-Type`) and DEBUG for others (a garbage request line). `quiet_bad_requests` installs a
filter that turns each of those records into one DEBUG line naming what was wrong; anything else
aiohttp logs there is left as it is. `answer_in_json` makes a connection's handler answer them as
every other error is answered (CONTRACT 5): `{"success": false, "error_code", "message"}` with
the status of the contract's table, instead of aiohttp's text/plain page.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from spear.core.contract import ErrorReply
from spear.core.enums import HTTP_STATUS, ErrorCode

SERVER_LOGGER = "aiohttp.server"


class BadRequestFilter(logging.Filter):
    """Rewrites a record about a request aiohttp could not parse into one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Shorten a record about a malformed request (kept only if DEBUG is on); keep the rest."""
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            what = " ".join(f"{error.message or type(error).__name__}".split())[:200]
            record.msg, record.args = "%s: 400 %s", (record.getMessage(), what)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            # The logger let it through at its old level: kept only where DEBUG is wanted.
            return logging.getLogger(SERVER_LOGGER).isEnabledFor(logging.DEBUG)
        return True


def quiet_bad_requests() -> None:
    """Install the filter on aiohttp's server logger (once)."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, BadRequestFilter) for f in logger.filters):
        logger.addFilter(BadRequestFilter())


class JsonErrorsHandler(RequestHandler):
    """aiohttp's handler of one connection, answering the requests aiohttp refuses itself (it
    calls `handle_error` for those) with the contract's JSON body; what aiohttp logs, and that it
    closes the connection, stay its own."""

    __slots__ = ()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """The contract's error reply for a request aiohttp could not take."""
        super().handle_error(request, status, exc, message)  # logs it; raises if a response has begun
        code = _contract_code(status)
        said = message or (exc.message if isinstance(exc, HttpProcessingError) else "") or HTTPStatus(status).phrase
        what = "malformed HTTP request" if status < 500 else "the server could not take the request"
        reply = ErrorReply(False, code, f"{what}: {' '.join(str(said).split())[:300]}")
        response = web.Response(
            body=msgspec.json.encode(reply), status=HTTP_STATUS[code], content_type="application/json"
        )
        response.force_close()
        return response


def answer_in_json(handler: RequestHandler) -> None:
    """Make a connection's handler, just made by aiohttp, a JsonErrorsHandler (aiohttp offers no
    hook to choose the class; the subclass adds no state, so the object is the same)."""
    handler.__class__ = JsonErrorsHandler


def _contract_code(status: int) -> ErrorCode:
    """The contract's error code for the status aiohttp chose."""
    if status in (413, 431):  # a body, or headers, over aiohttp's limits
        return ErrorCode.PAYLOAD_TOO_LARGE
    if status == 504:
        return ErrorCode.DEADLINE_EXCEEDED
    return ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_ARGUMENT
