"""The API's Redis connections pack commands with hiredis (shared/store/connection.py): byte for
byte what redis-py's own asyncio connection sends, and the same error for what Redis cannot take."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from shared.store.connection import PackedConnection

COMMANDS = [
    ("SET", "cq:job:1", "é ünïcode"),
    ("CONFIG GET", "maxmemory"),  # a command name of two words
    (b"OBJECT ENCODING", b"k"),
    ("EVALSHA", "a" * 40, 2, "k1", "k2", 1732481234.123456, 0.1, 1e20, -7, 3, b"\x00\xff" * 5000),
    ("RPUSH", "series", memoryview(np.arange(700, dtype=np.float32).tobytes()), bytearray(b"abc")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_a_command_is_packed_as_redis_py_packs_it(command):
    assert b"".join(PackedConnection().pack_command(*command)) == b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("value", [None, True, [1]])
def test_what_redis_cannot_store_is_a_data_error_as_before(value):
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        PackedConnection().pack_command("SET", "k", value)


def test_a_connection_with_another_text_encoding_packs_as_redis_py_does():
    command = ("SET", "k", "é")
    latin = PackedConnection(encoding="latin-1")
    assert b"".join(latin.pack_command(*command)) == b"".join(Connection(encoding="latin-1").pack_command(*command))
    assert b"\xe9" in b"".join(latin.pack_command(*command))


def test_a_pool_from_a_url_uses_it_and_its_commands_reach_redis(redis_server):
    async def roundtrip():
        pool = aioredis.ConnectionPool.from_url(redis_server.url, connection_class=PackedConnection)
        client = aioredis.Redis(connection_pool=pool)
        try:
            await client.set("cq:test:packed", "é" * 3)
            async with client.pipeline(transaction=False) as pipe:
                pipe.rpush("cq:test:packed-list", b"\x00" * 10_000, "x").lrange("cq:test:packed-list", 0, -1)
                replies = await pipe.execute()
            return pool.connection_class, await client.get("cq:test:packed"), replies[1]
        finally:
            await client.delete("cq:test:packed", "cq:test:packed-list")
            await client.aclose()

    used, value, items = asyncio.run(roundtrip())
    assert used is PackedConnection and value == "é".encode() * 3 and items == [b"\x00" * 10_000, b"x"]
