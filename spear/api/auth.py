"""Bearer-token authentication and role checks for the HTTP API.

Every route of the route table names the role it needs (`Route.role`; None is open). With no
token configured authentication is off; the CLI refuses to serve a non-loopback host that way
unless told `--insecure`. Missing or unknown token: 401 UNAUTHENTICATED with
`WWW-Authenticate: Bearer`; a token without the role: 403 PERMISSION_DENIED.

Browsers send a page's requests to any origin, with no token but whatever the page chooses
(probe34: a page on another local port invoked and cancelled functions of a tokenless spear up
through `fetch(..., {mode: "no-cors"})` and `sendBeacon`, which need no CORS preflight). So a
request that changes anything is refused (403) when the browser says it comes from another
origin or site (`Origin`, `Sec-Fetch-Site`); clients that are not browsers send neither. And with
authentication off on a loopback listener, a request must name this machine in `Host` (a page
whose own name was made to resolve to 127.0.0.1, DNS rebinding, names its own), or a name in
`[api] allowed_hosts`.
"""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path

from aiohttp import web

from spear.core.config import ApiSettings
from spear.core.enums import ApiError, ErrorCode
from spear.core.tokens import TokenTable, parse_lines

TOKENS = web.AppKey("tokens", TokenTable)


class AuthError(ApiError):
    """401 or 403, with the header RFC 6750 asks for."""

    @property
    def headers(self) -> dict[str, str]:
        """The `WWW-Authenticate` header RFC 6750 asks for with a 401 or 403."""
        if self.code == ErrorCode.UNAUTHENTICATED:
            return {"WWW-Authenticate": 'Bearer realm="spear"'}
        return {"WWW-Authenticate": 'Bearer realm="spear", error="insufficient_scope"'}


def load_tokens(settings: ApiSettings) -> TokenTable:
    """The configured tokens: `[api] tokens`, then the lines of `[api] tokens_file`."""
    lines = list(settings.tokens)
    if settings.tokens_file:
        lines += Path(settings.tokens_file).read_text().splitlines()
    return TokenTable(parse_lines(lines))


@functools.lru_cache(maxsize=256)  # (asked per HTTP request, of a few names)
def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (localhost or a loopback address)."""
    host = host.strip("[]")  # (an IPv6 literal as a URL writes it)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def refuse_cross_site(request: web.Request, settings: ApiSettings, authenticating: bool) -> None:
    """Raise PERMISSION_DENIED for a browser's cross-site request that changes anything, and, with
    authentication off on a loopback listener, for a `Host` that does not name this machine."""
    if request.method not in SAFE_METHODS:
        fetched_from = request.headers.get("Sec-Fetch-Site", "").strip().lower()
        if fetched_from not in ("", "same-origin", "none"):
            raise ApiError(ErrorCode.PERMISSION_DENIED, f"a {fetched_from} request from a browser page is refused")
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(request, origin.strip().lower(), settings):
            raise ApiError(ErrorCode.PERMISSION_DENIED, "a request from a page of another origin is refused")
    if authenticating or not is_loopback(settings.host) or "Host" not in request.headers:
        return
    named = _split_port(request.host.lower())[0].rstrip(".")  # (not request.url: it builds a URL per request)
    allowed = {name.lower().rstrip(".") for name in settings.allowed_hosts}
    if not (is_loopback(named) or named.endswith(".localhost") or named in allowed):
        raise ApiError(
            ErrorCode.PERMISSION_DENIED,
            "Host must name this machine (localhost, a loopback address) or one of [api] allowed_hosts",
        )


def _same_origin(request: web.Request, origin: str, settings: ApiSettings) -> bool:
    """Whether a page at `origin` is this API's own. Host and port only: behind a proxy that ends
    TLS the page's scheme is not the request's. A proxy may send its own name in `Host` (nginx's
    default): then the first name it forwards counts (with the page's port, unless it forwards
    none), and a name of `[api] allowed_hosts` on the default port of the page's scheme."""
    named = origin.partition("://")[2]
    if not named:  # `null` (a sandboxed or opaque page), or no origin at all
        return False
    if named == request.host.lower():
        return True
    page_host, page_port = _split_port(named)
    forwarded = request.headers.get("X-Forwarded-Host", "").partition(",")[0].strip().lower()
    if forwarded:
        forwarded_host, forwarded_port = _split_port(forwarded)
        if forwarded_host == page_host and forwarded_port in (page_port, ""):
            return True
    # (a page on another port of an allowed name is another origin: review32)
    return not page_port and page_host in {name.lower().rstrip(".") for name in settings.allowed_hosts}


def _split_port(netloc: str) -> tuple[str, str]:
    """`host:port` as (host, port); port "" when none is given (IPv6 in brackets, as URLs write it)."""
    host, colon, port = netloc.rpartition(":")
    if colon and port.isdigit() and (not host.startswith("[") or host.endswith("]")):
        return host.strip("[]"), port
    return netloc.strip("[]"), ""


def authorize(request: web.Request, role: str | None) -> None:
    """Raise AuthError unless the request's bearer token grants `role` (None: open route)."""
    table = request.app[TOKENS]
    if role is None or not table.enabled:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(ErrorCode.UNAUTHENTICATED, "this route needs an Authorization: Bearer <token> header")
    stored = table.authenticate(token.strip())
    if stored is None:
        raise AuthError(ErrorCode.UNAUTHENTICATED, "unknown bearer token")
    if not stored.grants(role):
        raise AuthError(ErrorCode.PERMISSION_DENIED, f"token {stored.name!r} lacks the role {role!r}")
