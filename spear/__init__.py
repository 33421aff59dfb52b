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

from __future__ import annotations

from importlib import import_module, metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (PEP 562): `import spear` stays cheap
    from spear import errors
    from spear.client import Client, Event, Execution, ExecutionHandle
    from spear.sync_client import SyncClient
    from spear.worker.context import Context, ExecutionCancelled, InvalidArgument, NonRetryableError
    from spear.worker.tasks import Function, Task, TaskDefinitionError

try:  # one version, pyproject.toml's, read from the installed package's metadata
    __version__ = metadata.version("spear")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Where each public name lives. Importing them all at once would load nats, aiohttp and
# OpenTelemetry (half a second) for every `spear` command and every `import spear`, and a Ctrl-C
# in that half second could not be answered cleanly (spear.cli.entry).
_LAZY = {
    "errors": "spear.errors",
    "Client": "spear.client",
    "Event": "spear.client",
    "Execution": "spear.client",
    "ExecutionHandle": "spear.client",
    "SyncClient": "spear.sync_client",
    "Context": "spear.worker.context",
    "ExecutionCancelled": "spear.worker.context",
    "InvalidArgument": "spear.worker.context",
    "NonRetryableError": "spear.worker.context",
    "Function": "spear.worker.tasks",
    "Task": "spear.worker.tasks",
    "TaskDefinitionError": "spear.worker.tasks",
}


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (and then kept as a module attribute)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spear' has no attribute {name!r}")
    value = import_module(module) if name == "errors" else getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
