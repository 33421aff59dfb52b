"""Every failure an operation can end in, as the API error it stands for: the one mapping both
adapters use, so a NATS caller and an HTTP caller always get the same code for the same fault."""

from __future__ import annotations

import nats.js.errors

from spear.core.enums import ApiError, ErrorCode
from spear.core.eventstore import StoreFull, StoreUnavailable
from spear.jetstream.errors import INSUFFICIENT_RESOURCES, UNREACHABLE, jetstream_busy

STORE_FULL_RETRY_S = 5


def api_error(exc: Exception) -> ApiError:
    """`exc` as a request-level error: the store or NATS not answering is UNAVAILABLE (trying
    again may work); anything unforeseen is INTERNAL."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StoreUnavailable):
        return ApiError(ErrorCode.UNAVAILABLE, str(exc))
    if isinstance(exc, StoreFull):  # (probe20: INTERNAL, which the contract keeps for bugs)
        message = f"JetStream cannot store it: {exc} (its storage is full: raise its limit, or let retention free room)"
        return ApiError(ErrorCode.RESOURCE_EXHAUSTED, message, retry_after_s=STORE_FULL_RETRY_S)
    if isinstance(exc, UNREACHABLE):
        return ApiError(ErrorCode.UNAVAILABLE, f"NATS did not answer: {type(exc).__name__}")
    if isinstance(exc, nats.js.errors.APIError) and jetstream_busy(exc):
        return ApiError(ErrorCode.UNAVAILABLE, f"JetStream is unavailable for now: {exc.description} ({exc.err_code})")
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == INSUFFICIENT_RESOURCES:
        return api_error(StoreFull(exc.description or "insufficient resources"))
    return ApiError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def error_headers(error: ApiError) -> dict[str, str]:
    """Headers an error reply carries besides its body, the same over HTTP and NATS."""
    return {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else {}
