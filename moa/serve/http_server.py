"""The HTTP server under `moa serve`: uvicorn with a header read timeout and a drain that starts at SIGTERM.

uvicorn times out only idle keep-alive connections, so a client that sends its headers one byte a
second would hold a connection forever. `HeaderTimeoutProtocol` (uvicorn's h11 protocol) closes a
connection whose request headers are not complete `header_timeout` seconds after it opened or after
its previous response. Body read timeouts are the app's (moa.serve.app.read_json).

`Server.handle_exit` (SIGTERM or SIGINT) starts `on_exit` (the engine's shutdown) at once, beside
uvicorn's graceful shutdown, so requests still running at the deadline end through the app, a
stream with an error event and `data: [DONE]`, before uvicorn closes what is left a few seconds later.
"""
from __future__ import annotations

import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

CLOSE_MARGIN_S = 5.0  # after the drain's deadline, uvicorn waits this long for responses to end


def header_timeout_protocol(header_timeout: float):
    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_too_slow(self):
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data):
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._header_timer.cancel()

        def on_response_complete(self):
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm()

        def connection_lost(self, exc):
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit=None):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame):
        if self._on_exit is not None and not self.should_exit:
            threading.Thread(target=self._on_exit, name="moa-drain", daemon=True).start()
        super().handle_exit(sig, frame)


def serve(app, sock, *, shutdown_timeout: float, header_timeout: float, on_exit=None) -> None:
    """Run `app` on the listening socket `sock` until SIGTERM/SIGINT; `on_exit` starts the drain."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, http=header_timeout_protocol(header_timeout),
                            timeout_graceful_shutdown=shutdown_timeout + CLOSE_MARGIN_S)
    Server(config, on_exit).run(sockets=[sock])
