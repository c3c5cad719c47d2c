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
from .auth import is_loopback

__all__ = ["bind_host", "running_server", "serve"]

# the name the flat layout's CLI glue logged under: logging configurations keep matching
logger = logging.getLogger("esg_memory.serve")

def bind_host(host: str, insecure_local: bool, token: str | None) -> str:
    """The address actually bound: ``--insecure-local`` without a token keeps the server on 127.0.0.1."""
    if insecure_local and token is None and not is_loopback(host):
        logger.warning("--insecure-local without a token: binding 127.0.0.1 instead of %s", host)
        return "127.0.0.1"
    return host


def serve(
    model: Any,
    memory_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Run the app with uvicorn in this process (one worker: the model is loaded once). The app is built
    for ``host``: beyond loopback its reads need the token unless ``protect_reads=False``."""
    import uvicorn

    host = bind_host(host, bool(app_kwargs.get("insecure_local")), app_kwargs.get("token"))
    app = create_app(model, memory_dir, host=host, **app_kwargs)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0,
                   log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread (port 0: an ephemeral one); yields the base URL.

    On exit the server shuts down gracefully (lifespan included: queued work finishes, the
    directory lock is released). For tests, benchmarks and embedding in another program.

    An app whose reads are open only because it was built for loopback (`create_app` without ``host``
    or ``protect_reads``) is refused beyond loopback (`ConfigError`): build it with that ``host``, or
    with ``protect_reads=False`` to open its reads on purpose.
    """
    import uvicorn

    state = getattr(app, "state", None)  # what create_app recorded (another ASGI app has none: not checked)
    if not is_loopback(host) and getattr(state, "protect_reads", None) is False \
            and not getattr(state, "reads_opened", False):
        raise ConfigError(f"this app serves reads without a token because it was built for loopback; to bind "
                          f"{host!r} build it with create_app(..., host={host!r}) (reads then need the "
                          "token) or protect_reads=False (reads open on purpose)")

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
