"""A malformed HTTP request is the client's problem, not the server's: one debug line, no traceback.

aiohttp answers such a request 400 by itself, then logs it on `aiohttp.server` with the parser's
whole traceback, at ERROR for some (a duplicate `Content-Type`) and DEBUG for others (a garbage
request line). `quiet_bad_requests` installs a filter that turns each of those records into one
DEBUG line naming what was wrong; anything else aiohttp logs there is left as it is.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

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
