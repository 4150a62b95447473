"""Running an app with uvicorn, with a graceful drain on SIGTERM / SIGINT and a deadline on each
request's headers (`_H11`; the app's `ServerConfig.read_timeout_s`).

On the first signal the server stops accepting connections and answers new requests on open
connections with 503, lets in-flight requests finish for up to `drain_timeout` seconds, then ends
what is left (`Server.abort`: their engine requests cancelled, a stream closed with an error event
and `[DONE]`, an unstreamed request answered 503), as a second signal does at once; `run_server`
then returns normally, so `mixlab serve` exits 0. `ServerThread` runs an app in a background thread
(tests, notebooks).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ServerThread", "run_server"]

_GRACE = 5.0  # seconds after the drain's deadline for the requests then ended to send their answers


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, on_start: Callable[[int], None] | None = None,
                 drain_timeout: float = 30.0) -> None:
        super().__init__(config)
        self._app = app
        self._on_start = on_start
        self._drain_timeout = drain_timeout
        srv = getattr(getattr(app, "state", None), "server", None)
        if srv is not None:  # the app's connection cap (ServerConfig.max_connections) counts these
            srv.connections = self.server_state.connections

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_start is not None:  # the port bound (--port 0: the one the system chose)
            self._on_start(self.servers[0].sockets[0].getsockname()[1])

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # At the drain's deadline, what is still running is ended by the app (`Server.abort`), so that each client
        # gets an answer: uvicorn's own deadline, a grace period later, cancels the handlers' tasks, which cut a
        # stream off mid-body (no error event, no [DONE]; a traceback per stream in the log)
        srv = getattr(getattr(self._app, "state", None), "server", None)
        timer = asyncio.get_running_loop().call_later(self._drain_timeout, srv.abort) if srv is not None else None
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    def handle_exit(self, sig: int, frame: Any) -> None:
        srv = getattr(getattr(self._app, "state", None), "server", None)
        if srv is not None and self.should_exit and not srv.aborted:
            # a second signal ends the drain now, each request answered, not cut off (uvicorn's second Ctrl-C
            # stopped waiting for them: the streams were cut mid-body); a third Ctrl-C forces the exit
            srv.abort_soon()
            self._captured_signals.append(sig)
            return
        if srv is not None:
            srv.drain()  # requests arriving on open connections now get 503; background responses are cancelled
        super().handle_exit(sig, frame)


class _H11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head: uvicorn waits for ever for
    a new connection's request line and headers, and for the next request's once bytes of it came
    (its keep-alive timeout stops at the first byte), so a client that trickles them (slowloris)
    holds a connection for ever. The body has its own deadline (guard._Guard). A client that stops reading
    its response (a stream it no longer reads, the connection left open) is disconnected once nothing of
    it could be sent for as long: it held the request's handler, and its outputs, for ever."""

    read_timeout = 60.0  # seconds; _config makes a subclass with the app's ServerConfig.read_timeout_s
    _head_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:  # the client's buffers and ours are full: it reads nothing of what it is sent
        super().pause_writing()
        self._write_timer = self.loop.call_later(self.read_timeout, self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_late(self) -> None:
        # abort, not close: close waits for the unsent bytes to be read. The app's next send then sees a
        # disconnect (a stream's requests are cancelled, their cache freed)
        self.transport.abort()

    def _expect_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.read_timeout, self._head_late)

    def _head_late(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # else a request is being answered
        if idle and not self.transport.is_closing():
            self.transport.close()


def _config(app: Any, host: str, port: int, drain_timeout: float, log_level: str) -> uvicorn.Config:
    srv = getattr(getattr(app, "state", None), "server", None)
    timeout = srv.cfg.read_timeout_s if srv is not None else _H11.read_timeout
    http = type("_H11", (_H11,), {"read_timeout": timeout})
    # at log_level info, uvicorn's access log too: a line per request (client, method, path, status), on
    # stderr with the server's other lines (uvicorn writes it to stdout)
    logs = copy.deepcopy(LOGGING_CONFIG)
    logs["handlers"]["access"]["stream"] = "ext://sys.stderr"
    # mixlab's own lines ("mixlab.serve": what the access log cannot show; "mixlab.engine": a failed step's
    # traceback), formatted as uvicorn's
    logs["loggers"]["mixlab"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    # uvicorn's deadline comes _GRACE s after the app's (`_Server.shutdown`): time for the ended requests' answers
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", http=http,
                          timeout_graceful_shutdown=math.ceil(drain_timeout + _GRACE), log_config=logs)


def run_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
               log_level: str = "info", on_start: Callable[[int], None] | None = None) -> None:
    """Serve `app` until SIGTERM/SIGINT, then drain (see the module docstring). `on_start(port)` is
    called once the server listens, with the port it bound."""
    server = _Server(_config(app, host, port, drain_timeout, log_level), app, on_start, drain_timeout)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises a captured signal after its shutdown, under the handlers installed before it
    # started: make those no-ops so that a drained SIGTERM ends in a normal return (exit status 0).
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    # The heap at startup (torch, the model's modules, the tokenizer: ~200,000 objects) is never garbage, and
    # a full collection walked all of it holding the GIL: ~0.25 s in which no stream moved, set off whenever
    # a request made many objects (a 4 MB chat body: several times). Frozen, collections skip it, as vLLM's
    # API server does (vllm-project/vllm#12287); a heap the caller froze is left as it is.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        server.run()
    finally:
        if freeze:
            gc.unfreeze()
        for s, h in previous.items():
            signal.signal(s, h)


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` on a free loopback port in a daemon thread."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 5.0,
                 log_level: str = "warning") -> None:
        self.server = _Server(_config(app, host, port, drain_timeout, log_level), app, drain_timeout=drain_timeout)
        self.thread = threading.Thread(target=self.server.run, name="mixlab-serve", daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
