"""asyncio Redis connections that pack commands in C, as redis-py's blocking client already does.

redis-py's blocking `Connection` packs a command with hiredis (`HiredisRespSerializer`) when hiredis
is installed; its asyncio `Connection` always packs in Python, calling its encoder once per
argument. A job's *create* script has some 80 arguments (the record's fields, the keys, the series
chunks): packing one took 42 µs in Python and 5 µs with `hiredis.pack_command`, measured alone.
(yappi's CPU clock put packing at a quarter of the API's CPU under a steady stream of one-series
jobs, but it inflates many small calls; in the flood the difference was within its noise.) The
API's clients use this class (api/main.py). With redis-py's default encoder (utf-8, strict) its
output is byte for byte redis-py's; a connection configured otherwise packs as redis-py does.
"""

from __future__ import annotations

from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer


class PackedConnection(Connection):
    """A TCP connection (`redis://`) whose commands are packed by hiredis, through redis-py's own
    serializer for its blocking client (splitting 'CONFIG GET', buffers as bytes, DataError)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # hiredis encodes text as utf-8, strictly: another encoding (a `?encoding=` in the URL) keeps
        # redis-py's Python packer.
        native = (self.encoder.encoding, self.encoder.encoding_errors) == ("utf-8", "strict")
        self._serializer = HiredisRespSerializer() if native else None

    def pack_command(self, *args) -> list[bytes]:
        if self._serializer is None:
            return super().pack_command(*args)
        return self._serializer.pack(*args)
