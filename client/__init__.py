"""Python client of chronos-queue (blocking and asyncio)."""

from client.api import AsyncClient, Client
from client.errors import (
    ChronosQueueError,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from client.signature import verify_signature

__all__ = [
    "AsyncClient", "ChronosQueueError", "Client", "Conflict", "InvalidRequest", "NotFound", "RateLimited",
    "ServerError", "Unauthorized", "Unavailable", "WaitTimeout", "verify_signature",
]  # fmt: skip
