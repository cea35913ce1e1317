"""A deadline for a request's line and headers (Go's ``http.Server.ReadHeaderTimeout``).

uvicorn arms no timer on a new connection, and its keep-alive timer is cancelled by
the first byte of the next request, so a client that connects and sends nothing, or
half a request line, holds the connection (and its file descriptor) for good: 3,000
such connections were held open against kiln. Here every connection must finish a
request's headers within ``seconds`` of opening, or of its previous response
finishing; then the timer is off until the response is done, so a long upload or a
long stream is not cut.
"""

from __future__ import annotations

import asyncio
from typing import Any


def _with_deadline(base: type, seconds: float) -> type:
    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        header_timeout = seconds
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()  # as Go's server does: no response to a request never made

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a request's headers are in: its handler runs
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Armed again unless a pipelined request already started (it made a new cycle).
            if self._idle() and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def http_protocol(seconds: float) -> type:
    """The protocol class uvicorn's ``http="auto"`` would pick, with the deadline."""
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is a dependency; h11 is uvicorn's fallback
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return _with_deadline(base, seconds)
