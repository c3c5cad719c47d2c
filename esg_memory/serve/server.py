"""Running the app under uvicorn: `serve` (blocking, one worker) and `running_server` (a thread, for tests,
benchmarks and embedding)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from .app import create_app

__all__ = ["running_server", "serve"]

# the name the flat layout's CLI glue logged under: logging configurations keep matching
logger = logging.getLogger("esg_memory.serve")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: Any,
    memory_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Run the app with uvicorn in this process (one worker: the model is loaded once)."""
    import uvicorn

    if app_kwargs.get("insecure_local") and app_kwargs.get("token") is None and host not in _LOOPBACK:
        logger.warning("--insecure-local without a token: binding 127.0.0.1 instead of %s", host)
        host = "127.0.0.1"
    app = create_app(model, memory_dir, **app_kwargs)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0,
                   log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread (port 0: an ephemeral one); yields the base URL.

    On exit the server shuts down gracefully (lifespan included: queued work finishes, the
    directory lock is released). For tests, benchmarks and embedding in another program.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=int(port), log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="esg-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(10)
            raise ConfigError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}" if ":" not in host else f"http://[{host}]:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        if thread.is_alive():
            server.force_exit = True
            thread.join(10)
