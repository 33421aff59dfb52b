"""Bearer-token authentication and role checks for the HTTP API.

Every route of the route table names the role it needs (`Route.role`; None is open). With no
token configured authentication is off; the CLI refuses to serve a non-loopback host that way
unless told `--insecure`. Missing or unknown token: 401 UNAUTHENTICATED with
`WWW-Authenticate: Bearer`; a token without the role: 403 PERMISSION_DENIED.
"""

from __future__ import annotations

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


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (localhost or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


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
