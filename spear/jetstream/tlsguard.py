"""TLS asked for is TLS or no connection.

nats-py upgrades a connection to TLS only when the server's first INFO says `tls_required`: a
`tls://` URL, or a TLS context given, against a server that does not require TLS (or behind a
network attacker who strips the flag from INFO) connected in plain text, credentials and all,
and nothing said so (probe33). `install()` wraps nats-py's `Client._process_info` so that the
first INFO of a connection that asked for TLS and is not told to use it ends the attempt before
anything is sent: `TlsNotOffered`, an `ssl.SSLError`, which spear's connectors take for a refusal
(no point trying again; the configuration or the server must change).
"""

from __future__ import annotations

import ssl
from typing import Any

from nats.aio.client import Client


class TlsNotOffered(ssl.SSLError):
    """TLS was asked for, and the server does not require it: nothing is sent in plain text."""


_original = getattr(Client, "_process_info", None)


def wants_tls(client: Client) -> bool:
    """Whether this connection asked for TLS: a context given, or a `tls://` server."""
    server = getattr(client, "_current_server", None)
    scheme = server.uri.scheme if server is not None else ""
    return (client.options.get("tls") is not None and scheme not in ("ws", "wss")) or scheme == "tls"


async def process_info(self: Client, info: dict[str, Any], initial_connection: bool = False) -> None:
    """nats-py's `_process_info`, refusing a first INFO without `tls_required` when TLS was asked."""
    if initial_connection and not info.get("tls_required") and wants_tls(self):
        server = self._current_server
        where = f"{server.uri.hostname}:{server.uri.port}" if server is not None else "the server"
        raise TlsNotOffered(
            f"TLS was asked for (a tls:// URL or TLS settings), and NATS at {where} does not require it:"
            " not connecting in plain text (make the server require TLS, or use a nats:// URL and no TLS settings)"
        )
    assert _original is not None
    await _original(self, info, initial_connection)


def install() -> None:
    """Use this `_process_info` in every nats-py client of the process (a no-op if nats-py no
    longer has it)."""
    if _original is not None:
        Client._process_info = process_info  # type: ignore[method-assign]
