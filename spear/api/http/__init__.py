"""The HTTP adapter (aiohttp): the operations of the service layer, called in-process (no extra
NATS hop), under the routes of CONTRACT §5. One route table serves the requests and generates the
OpenAPI document. One idea a module:

- `app`: `create_app`, and the middlewares (span, count, authorization, contract error bodies);
- `routes`: the route table (`ROUTES`) and the role each route needs;
- `handlers`: one handler an operation;
- `exchange`: from a request to an operation's JSON request, and from its reply to a response;
- `sse`: stored events as Server-Sent Events;
- `prometheus`: `/metrics`, and the metrics-only application of the other components;
- `keys`: what the application holds for its handlers.
"""

from __future__ import annotations

from spear.api.http.app import create_app
from spear.api.http.keys import MERGED_METRICS, OPENAPI, SERVICE, STOPPING
from spear.api.http.prometheus import create_metrics_app
from spear.api.http.routes import ROLES, ROUTES
from spear.api.http.sse import KEEPALIVE_S, MAX_SEQUENCE_DIGITS

__all__ = [
    "KEEPALIVE_S",
    "MAX_SEQUENCE_DIGITS",
    "MERGED_METRICS",
    "OPENAPI",
    "ROLES",
    "ROUTES",
    "SERVICE",
    "STOPPING",
    "create_app",
    "create_metrics_app",
]
