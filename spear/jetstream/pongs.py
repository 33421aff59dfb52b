"""A PONG that answers a flush given up on no longer ends nats-py's read loop.

nats-py 2.16 keeps a future per PING in `Client._pongs` and sets the oldest one's result when a
PONG arrives. `flush(timeout)` cancels its future when the PONG is late (a stalled nats-server)
but leaves it in the list; when that PONG comes, `set_result` on the cancelled future raises
`InvalidStateError`, the read loop logs "nats: encountered error" and ends, and the connection,
still "connected", never reads again: every request times out from then on (probe26: one health
check during a 9 s stall of nats-server left `spear up` unusable until restarted). The PONG
still answers its PING, so this `_process_pong` takes the future off the list as nats-py does,
and sets its result only if it is not done.
"""

from __future__ import annotations

from nats.aio.client import Client

_original = getattr(Client, "_process_pong", None)


async def process_pong(self: Client) -> None:
    """nats-py's `Client._process_pong`, leaving alone a future that is done (cancelled)."""
    if len(self._pongs) > 0:
        future = self._pongs.pop(0)
        if not future.done():
            future.set_result(True)
        self._pongs_received += 1
        self._pings_outstanding = 0


def install() -> None:
    """Use this `_process_pong` in every nats-py client of the process (a no-op if nats-py no
    longer keeps its PONG futures where this looks)."""
    if _original is not None and isinstance(getattr(Client(), "_pongs", None), list):
        Client._process_pong = process_pong  # type: ignore[method-assign]


def original() -> object:
    """nats-py's own `_process_pong` (for the test that shows what this fixes), or None."""
    return _original
