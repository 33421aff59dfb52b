"""A TCP proxy whose traffic can be held up both ways, for a connection that stalls while the
processes at either end run on (a network fault, not a paused process), or runs late."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class StallProxy:
    """Forwards connections to `upstream`; `stall()` holds every byte back until `flow()`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stall(self) -> None:
        self.flowing.clear()

    def flow(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        """Close every connection made through it (new ones are taken as before)."""
        for task in list(self._pumps):
            task.cancel()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()  # (held: nothing more is read either, so the sender's buffers fill)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for pump in (self._pump(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[StallProxy]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self.flow()
            server.close()
            for task in list(self._pumps):
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)


class LagProxy(StallProxy):
    """A StallProxy whose traffic arrives `lag_s` late (set at any time) without a gap: bytes keep
    flowing at their pace, each chunk held for the same time (a link whose buffers fill)."""

    lag_s = 0.0

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def write() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        writing = asyncio.create_task(write())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.lag_s, data))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writing.cancel()
            writer.close()
