"""The HTTP protocol the API runs under: uvicorn's, with a deadline for receiving request headers.

uvicorn's only timeout on reading is the keep-alive one, and every byte received resets it, so a
client that trickles a request line or headers holds a connection (and its memory) for as long as
it likes: hundreds of such connections, keyless, starve everyone else. This protocol closes a
connection whose request headers have not all arrived within HEADER_TIMEOUT_S of connecting, or
of the first byte of its next request. Bodies have their own deadline (BODY_TIMEOUT_S, enforced
where routes read them). It is written here because uvicorn offers no such setting (uvicorn
issue #157 lists it among the timeouts it does not have).

    uvicorn --factory api.main:create_app --http api.protocol:HeaderDeadline
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import get_settings

log = logging.getLogger(__name__)


class HeaderDeadline(HttpToolsProtocol):
    timeout_s: float = get_settings().header_timeout_s
    _deadline: asyncio.TimerHandle | None = None

    # uvicorn narrows asyncio.Protocol.connection_made to an asyncio.Transport (and ignores [override] itself).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.warning("closed a connection whose request headers took over %gs (HEADER_TIMEOUT_S)", self.timeout_s)
            self.transport.close()
