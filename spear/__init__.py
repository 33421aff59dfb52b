"""spear: event-sourced function invocation on NATS JetStream.

The public face for writing your own functions:

    import spear

    shop = spear.Task("shop", description="order functions")

    @shop.function
    def total(prices: list[float], tax: float = 0.0) -> float:
        return sum(prices) * (1 + tax)

served with `spear up --task shop_module:shop` (or `spear worker --task …`); and for calling
functions, `spear.Client` (async) and `spear.SyncClient`, with errors in `spear.errors`:

    async with spear.Client("nats://127.0.0.1:4222") as client:
        print(await client.invoke("demo", "calculate_fibonacci", n=30))
"""

from importlib import metadata

from spear import errors
from spear.client import Client, Event, Execution, ExecutionHandle
from spear.sync_client import SyncClient
from spear.worker.context import Context, ExecutionCancelled, InvalidArgument, NonRetryableError
from spear.worker.tasks import Function, Task, TaskDefinitionError

try:  # one version, pyproject.toml's, read from the installed package's metadata
    __version__ = metadata.version("spear")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Client",
    "Context",
    "Event",
    "Execution",
    "ExecutionCancelled",
    "ExecutionHandle",
    "Function",
    "InvalidArgument",
    "NonRetryableError",
    "SyncClient",
    "Task",
    "TaskDefinitionError",
    "__version__",
    "errors",
]
