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

import hiredis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError


class PackedConnection(Connection):
    """A TCP connection (`redis://`) whose commands are packed by hiredis."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # hiredis encodes text as utf-8, strictly: another encoding (a `?encoding=` in the URL) keeps
        # redis-py's packer.
        self._packs_natively = (self.encoder.encoding, self.encoder.encoding_errors) == ("utf-8", "strict")

    def pack_command(self, *args) -> list[bytes]:
        if not self._packs_natively:
            return super().pack_command(*args)
        # As redis-py's HiredisRespSerializer: a command name of several words ('CONFIG GET') is sent
        # as several arguments, and hiredis packs bytes, not buffers.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        if any(isinstance(arg, (bytearray, memoryview)) for arg in args):
            args = tuple(bytes(arg) if isinstance(arg, (bytearray, memoryview)) else arg for arg in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # what redis-py's encoder raises for None, a bool, a list...
            raise DataError(str(exc)) from exc
