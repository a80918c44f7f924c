"""Running the app under uvicorn, with a graceful SIGTERM: ``cai serve`` calls :func:`serve`.

SIGTERM (or the first Ctrl-C): the app's ``draining`` flag is set at once, so new requests and ``/health`` get 503
(a load balancer stops sending work); after ``Settings.drain_grace_s`` seconds uvicorn closes the listening socket,
waits for the requests in flight (a stream in progress runs to its ``data: [DONE]``), runs the lifespan shutdown
(the engine drains), and the process exits 0. A second signal forces the exit.

Why a subclass: uvicorn's own ``handle_exit`` only sets ``should_exit``, and it records the signal to re-raise it after
the server stops, which under the default SIGTERM disposition kills the process with status 143 instead of 0.
"""

from __future__ import annotations

import time
from typing import Any

import uvicorn

from cai.core.errors import CaiError
from server.app import create_app
from server.settings import Settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any, grace_s: float):
        super().__init__(config)
        self.app_state = state
        self.grace_s = grace_s
        self.stop_at: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.stop_at is None:
            self.app_state.draining = True
            self.stop_at = time.monotonic() + self.grace_s
        else:                                  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain. A model that fails to load raises its CaiError."""
    fatal: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(error: BaseException) -> None:
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            # uvicorn types it int but waits with asyncio: a float of seconds works as it reads
                            timeout_graceful_shutdown=settings.drain_timeout_s)  # type: ignore[arg-type]
    server = DrainingServer(config, app.state.server, settings.drain_grace_s)
    server.run()
    if fatal:
        error = fatal[0]
        raise error if isinstance(error, CaiError) else CaiError(f"cannot serve: {error}")
    if not server.started:
        raise CaiError(f"the server did not start on {host}:{port} (see the log above)")
    return 0
