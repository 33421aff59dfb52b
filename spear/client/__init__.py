"""The Python client SDK: invoke functions, follow executions and read spear's state over NATS,
as the wire contract (docs/contract.md) describes it.

    async with spear.Client("nats://127.0.0.1:4222") as client:
        print(await client.invoke("demo", "calculate_fibonacci", n=30))

Errors are typed (`spear.errors`): a request that fails raises the error of its code
(`NotFound`, `InvalidArgument`, `Unavailable`, ...); an execution that ends other than COMPLETED
raises `FunctionFailed`, `Timeout` or `Cancelled` with the remote error and the execution id.
Waiting is done by subscription to the execution's stored events, never by polling. `SyncClient`
(in spear.sync_client) wraps it for scripts. One idea a module:

- `async_client`: `Client`, its one request path and a method an operation;
- `handle`: `ExecutionHandle`, an accepted execution (status, result, events, chunks, cancel);
- `results`: what the client hands back (`Execution`, `Event`, `Chunk`);
- `connection`: connecting to NATS within a time limit, failing clearly;
- `wire`: the request it sends, how long SYNC waits, and the typed error a reply stands for.
"""

from __future__ import annotations

from spear.client.async_client import NO_RESPONDERS_RETRY_S, Client
from spear.client.handle import ExecutionHandle
from spear.client.results import Chunk, Event, Execution, stream_restart
from spear.client.wire import invoke_request, sync_wait

__all__ = [
    "NO_RESPONDERS_RETRY_S",
    "Chunk",
    "Client",
    "Event",
    "Execution",
    "ExecutionHandle",
    "invoke_request",
    "stream_restart",
    "sync_wait",
]
