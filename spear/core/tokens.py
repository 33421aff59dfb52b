"""Bearer tokens for the HTTP API: minted at random, stored only as salted SHA-256 hashes, checked
in constant time. Pure (the caller reads the tokens file and passes its lines).

A stored line is `<name> <role>[,<role>…] sha256$<salt hex>$<digest hex>`; the digest is
SHA-256(salt ‖ token). Tokens carry 256 random bits, so a fast hash with a salt is enough: there is
nothing to guess that a slow hash would protect.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

INVOKE = "invoke"  # invoke and cancel
READ = "read"  # status, events, lists, tasks, stats, metrics, detailed health
ADMIN = "admin"  # task registration and deletion; implies every other role
ROLES = (INVOKE, READ, ADMIN)

TOKEN_PREFIX = "spear_"
SCHEME = "sha256"


class TokenFormatError(ValueError):
    """A token line that cannot be read; the message says what is wrong."""

    pass


@dataclass(frozen=True)
class StoredToken:
    """What is kept of a token: its name, roles and salted hash."""

    name: str
    roles: frozenset[str]
    salt: bytes
    digest: bytes

    def grants(self, role: str) -> bool:
        """Whether the token's roles include `role` (admin includes all)."""
        return role in self.roles or ADMIN in self.roles

    def line(self) -> str:
        """The token as a line of a tokens file."""
        roles = ",".join(r for r in ROLES if r in self.roles)
        return f"{self.name} {roles} {SCHEME}${self.salt.hex()}${self.digest.hex()}"


def new_token() -> str:
    """A new random token (256 bits, URL-safe text)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _digest(salt: bytes, token: str) -> bytes:
    # (surrogatepass: a header's bytes that are not UTF-8 come as lone surrogates; such a token
    # matches nothing, it does not raise: probe34 saw a 500 and a traceback per request)
    return hashlib.sha256(salt + token.encode("utf-8", "surrogatepass")).digest()


def hash_token(name: str, roles: Iterable[str], token: str) -> StoredToken:
    """What is kept of a token: its name, roles and salted hash."""
    chosen = frozenset(roles)
    unknown = chosen - set(ROLES)
    if unknown or not chosen:
        raise TokenFormatError(f"roles must be some of {', '.join(ROLES)}, not {sorted(unknown) or 'none'}")
    if not name or any(c.isspace() for c in name):
        raise TokenFormatError(f"token name {name!r} must be one word")
    salt = secrets.token_bytes(16)
    return StoredToken(name, chosen, salt, _digest(salt, token))


def parse_line(line: str) -> StoredToken:
    """A stored token from its line; TokenFormatError if it is malformed."""
    parts = line.split()
    if len(parts) != 3:
        raise TokenFormatError(f"token line {line!r} is not '<name> <roles> sha256$<salt>$<digest>'")
    name, roles, hashed = parts
    scheme, _, rest = hashed.partition("$")
    salt_hex, _, digest_hex = rest.partition("$")
    try:
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        raise TokenFormatError(f"token {name!r}: salt and digest must be hex") from None
    if scheme != SCHEME or len(digest) != hashlib.sha256().digest_size or not salt:
        raise TokenFormatError(f"token {name!r}: the hash must be {SCHEME}$<salt hex>$<64 hex digits>")
    role_set = frozenset(roles.split(","))
    if not role_set <= set(ROLES):
        raise TokenFormatError(f"token {name!r}: roles must be some of {', '.join(ROLES)}, not {roles!r}")
    return StoredToken(name, role_set, salt, digest)


def parse_lines(lines: Iterable[str]) -> list[StoredToken]:
    """Token lines as in a tokens file: blank lines and `#` comments are skipped."""
    return [parse_line(line) for line in (raw.strip() for raw in lines) if line and not line.startswith("#")]


class TokenTable:
    """The tokens a server accepts. Empty: authentication is off."""

    def __init__(self, tokens: Iterable[StoredToken] = ()):
        self.tokens = list(tokens)

    @property
    def enabled(self) -> bool:
        """Whether any token is configured (authentication on)."""
        return bool(self.tokens)

    def authenticate(self, token: str) -> StoredToken | None:
        """The stored token this one matches, comparing every entry in constant time."""
        found = None
        for stored in self.tokens:
            if hmac.compare_digest(_digest(stored.salt, token), stored.digest) and found is None:
                found = stored
        return found
