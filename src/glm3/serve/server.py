"""Running the server: its settings, the engine in a thread of its own, uvicorn on a socket bound first (so a
port in use is one clear error), shut down by Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket

from glm3.settings import setting

log = logging.getLogger(__name__)

API_KEY_ENV = "GLM3_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "address to listen on (loopback; 0.0.0.0 listens on every interface)")
    port: int = setting(8000, "TCP port to listen on")
    api_key: str | None = setting(
        None, f"require `Authorization: Bearer KEY` on /v1 routes (default: ${API_KEY_ENV}; unset: no key)"
    )
    served_model_name: str = setting("chatglm3-6b", "the model id clients name in requests and /v1/models lists")
    max_body_bytes: int = setting(4 << 20, "largest request body accepted, in bytes (beyond it: 413)")

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")

    @property
    def key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError naming the address when it cannot be had)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """Ctrl-C or SIGTERM shuts down gracefully and the command exits 0 (uvicorn would re-raise the signal
        afterwards, ending the process by it); a second Ctrl-C stops at once."""

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(sig, frame):
                self.force_exit = self.should_exit and sig == signal.SIGINT
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def serve(model: str, server: ServerConfig, engine_config, dtype: str = "auto", kernels: str = "auto") -> int:
    """Load the model (a model directory or a paged export), then serve until Ctrl-C or SIGTERM."""
    import uvicorn

    from glm3.runtime.engine import BackgroundEngine
    from glm3.serve.app import create_app
    from glm3.serve.engines import load_engine

    sock = listen(server.host, server.port)  # before the (long) load: a port in use fails at once
    engine, tokenizer = load_engine(model, engine_config, dtype=dtype, kernels=kernels)
    background = BackgroundEngine(engine)
    try:
        app = create_app(background, tokenizer, server.served_model_name, server.key, server.max_body_bytes)
        host, port = sock.getsockname()[:2]
        print(f"glm3 serve: {engine.description}", flush=True)
        print(
            f"glm3 serve: {server.served_model_name} at http://{host}:{port}/v1"
            + (" (API key required)" if server.key else ""),
            flush=True,
        )
        _uvicorn_server()(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        background.close()
        sock.close()
    return 0
