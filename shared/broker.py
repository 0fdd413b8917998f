"""kombu's Redis transport, keeping one Redis client per channel instead of making one per command.

kombu's Redis channel builds a new `redis.Redis` around its connection pool for each command it
sends outside its BRPOP loop: twice per message on a worker (recording the message in `unacked` as
it arrives, deleting it at the ack), and once per message sent. redis-py 8 makes that object costly
(it copies some 250 response callbacks into a case-insensitive dict): 168 µs each on the 2-core
host, on Celery's consumer thread, holding the GIL that the model thread needs between its ops.
A `redis.Redis` is safe to share between threads (each command borrows a connection from the pool),
so each channel keeps one, made again when kombu replaces its pool (after a connection error).

Only `redis://` brokers use it (`transport_for`); any other URL keeps kombu's own: kombu turns TLS
on for a `rediss://` URL only when the transport is the one named `rediss`, so a transport given
by path would connect to it in plain text.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _kept: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> redis.Redis:
        if asynchronous:  # the BRPOP/pub-sub client: kombu makes it once per channel already
            return super()._create_client(asynchronous=True)  # type: ignore[misc]  # not in kombu's stubs
        pool = self.pool
        if self._kept is None or self._kept.connection_pool is not pool:
            self._kept = super()._create_client()  # type: ignore[misc]
        return self._kept


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(url: str) -> str | None:
    """Celery's `broker_transport` for a broker URL: this module's for plain Redis, else None
    (kombu's choice by the URL's scheme)."""
    return f"{__name__}:Transport" if urlsplit(url).scheme == "redis" else None
