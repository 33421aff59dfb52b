"""One way to connect to NATS: the configured servers and credentials, reconnecting forever
(nats-py gives up after 60 tries by default, which a service must not)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, TypedDict

from nats.aio.client import Client
from nats.errors import AuthorizationError

from spear.core.config import ConfigError, Settings, shown_urls
from spear.jetstream import headers, hpub, pongs, tlsguard, wireparser
from spear.jetstream.permissions import COMPONENT_INBOX
from spear.telemetry.logs import no_execution

log = logging.getLogger(__name__)


_reconnect_listeners: dict[int, list[Callable[[], None]]] = {}


def on_reconnect(nc: Client, listener: Callable[[], None]) -> None:
    """Call `listener` after `nc` reconnects (a restarted server forgets pull requests, say)."""
    _reconnect_listeners.setdefault(id(nc), []).append(listener)


# A server that stops answering (SIGSTOP, a hung host, a cut that sends no RST) keeps its TCP
# connections open: only unanswered PINGs notice. nats-py pings every 120 s and gives up after 2
# outstanding, so clients stayed on a frozen node for about 6 minutes (probe58). Pinging every
# PING_INTERVAL_S, a connection is found stale, and the client moves to another server, after
# (MAX_OUTSTANDING_PINGS + 1) * PING_INTERVAL_S = 12 s. Both spear's components and its client use these.
PING_INTERVAL_S = 4
MAX_OUTSTANDING_PINGS = 2


class CredentialsRefused(ConnectionError):
    """NATS refused the configured credentials: waiting would not help, so start-up stops."""


async def connect(settings: Settings, name: str) -> Client:
    """Connect, waiting for NATS as long as it takes, except when it refuses our credentials."""
    headers.install()
    wireparser.install()
    hpub.install()
    pongs.install()
    tlsguard.install()
    nc = Client()
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    errors = RepeatedErrors(shown_urls(settings.nats.urls))

    async def error(exc: Exception) -> None:
        # Before the first connection, say that it waits: a wrong URL otherwise looks like a hang
        # (not for refused credentials: those end the start, review43).
        with no_execution():
            errors.log(exc, "" if connecting.done() or refused.done() or is_refusal(exc) else WAITING)
        if is_refusal(exc) and not nc.is_connected and not refused.done():
            refused.set_result(exc)

    async def reconnected() -> None:
        errors.reset()
        with no_execution():
            log.info("nats: reconnected")
        for listener in _reconnect_listeners.get(id(nc), []):
            listener()

    async def disconnected() -> None:
        # close() and drain() disconnect too (status CLOSED by the time they say so): asked for,
        # so not worth a warning on every clean stop. A server gone is (the client reconnects).
        with no_execution():
            if nc.is_closed or nc.is_draining:
                log.debug("nats: disconnected (closing)")
            else:
                log.warning("nats: disconnected")

    async def closed() -> None:
        _reconnect_listeners.pop(id(nc), None)

    connecting = asyncio.ensure_future(
        nc.connect(
            **credentials(settings),
            servers=settings.nats.urls,
            name=name,
            # Replies to spear's components (JetStream API, direct gets, pulls) come to an inbox space
            # the client role cannot subscribe to (deploy/spear-users.conf).
            inbox_prefix=COMPONENT_INBOX,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # nats-py says int; it sleeps this long, a float works
            connect_timeout=5,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=error,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            closed_cb=closed,
        )
    )
    first: set[asyncio.Future[Any]] = {connecting, refused}
    try:
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await nc.close()
        urls, reason = shown_urls(settings.nats.urls), refused.result()
        if isinstance(reason, ssl.SSLError):
            raise CredentialsRefused(f"TLS with NATS at {urls} failed: {reason}")
        raise CredentialsRefused(f"NATS at {urls} refused the credentials: {reason}")
    connecting.result()
    return nc


WAITING = "; trying again until it answers (Ctrl-C stops)"


class RepeatedErrors:
    """A connection's errors in the log: each one when it first comes, the same one again only
    every EVERY_S (with how often it came meanwhile). A client retrying an unreachable server
    four times a second would otherwise write 240 identical lines a minute, per connection."""

    EVERY_S = 30.0

    MAX_KINDS = 64  # different errors remembered (each server's address makes its own text)

    def __init__(self, servers: str) -> None:
        self.servers = servers
        self.seen: dict[str, tuple[float, int]] = {}  # error text -> (when logged, repeats since)

    def log(self, exc: Exception, then: str = "") -> None:
        """Log `exc` (and what happens `then`) unless the same error was logged less than EVERY_S ago."""
        text, now = str(exc) or type(exc).__name__, time.monotonic()
        logged_at, repeats = self.seen.get(text, (0.0, -1))
        if repeats >= 0 and now - logged_at < self.EVERY_S:
            self.seen[text] = (logged_at, repeats + 1)
            return
        again = f" (again, {repeats + 1} times in {now - logged_at:.0f} s)" if repeats >= 0 else ""
        log.warning("nats (%s): %s%s%s", self.servers, text, again, then)
        if len(self.seen) >= self.MAX_KINDS and text not in self.seen:
            self.seen.clear()
        self.seen[text] = (now, 0)

    def reset(self) -> None:
        """Connected again: the next error is news."""
        self.seen.clear()


class Credentials(TypedDict, total=False):
    """The nats-py connect options that carry credentials and TLS."""

    tls: ssl.SSLContext
    user: str
    password: str
    token: str
    user_credentials: str


def credentials(settings: Settings) -> Credentials:
    """The nats-py connect options for the configured credentials and TLS."""
    nats_settings = settings.nats
    options = Credentials()
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    if nats_settings.user:
        options["user"] = nats_settings.user
        if nats_settings.password is not None:
            options["password"] = nats_settings.password
    if nats_settings.token:
        options["token"] = nats_settings.token
    if nats_settings.creds_file:
        options["user_credentials"] = nats_settings.creds_file
    return options


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS to NATS when a CA, a client certificate or a key is configured (a tls:// URL alone gets
    nats-py's default context): the server verified by the CA (else the system's), and for mTLS
    our certificate."""
    nats_settings = settings.nats
    if not (nats_settings.tls_ca or nats_settings.tls_cert or nats_settings.tls_key):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=nats_settings.tls_ca)
    except OSError as exc:  # a missing or unreadable file, or not a certificate (ssl.SSLError)
        raise ConfigError(f"[nats] tls_ca (SPEAR_NATS__TLS_CA): {nats_settings.tls_ca}: {_reason(exc)}") from None
    if nats_settings.tls_cert or nats_settings.tls_key:
        if not (nats_settings.tls_cert and nats_settings.tls_key):
            raise ConfigError("[nats] tls_cert and tls_key go together (a client certificate and its key)")
        try:
            context.load_cert_chain(nats_settings.tls_cert, nats_settings.tls_key)
        except OSError as exc:
            files = f"{nats_settings.tls_cert}, {nats_settings.tls_key}"
            raise ConfigError(
                f"[nats] tls_cert and tls_key (SPEAR_NATS__TLS_CERT, _KEY): {files}: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: OSError) -> str:
    """Why a file could not be used: the system's words ("No such file or directory"), or SSL's."""
    return str(exc) if isinstance(exc, ssl.SSLError) or not exc.strerror else exc.strerror


def is_refusal(exc: BaseException) -> bool:
    """NATS refused our credentials or TLS: trying again would not help."""
    # nats-py reports the server's -ERR as a plain Error carrying the server's words
    text = str(exc).lower()
    return (
        isinstance(exc, AuthorizationError | ssl.SSLError)
        or "authorization violation" in text
        or "authentication" in text
    )
