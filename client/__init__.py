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

__all__ = [
    "AsyncClient", "ChronosQueueError", "Client", "Conflict", "InvalidRequest", "NotFound", "RateLimited",
    "ServerError", "Unauthorized", "Unavailable", "WaitTimeout",
]  # fmt: skip
