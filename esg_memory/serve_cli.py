"""Command-line glue of ``esg-memory serve``: options, token loading, opening the model, running uvicorn.

The lead's CLI wires it as a subcommand in one line::

    add_serve_arguments(sub.add_parser("serve", help="HTTP service")).set_defaults(
        func=lambda session, args: run_from_args(args))
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, EsgMemoryError
from .serve_batch import DirectoryLock
from .serve_core import DEFAULT_MAX_UPLOAD_BYTES, MIN_TOKEN_CHARS, TOKEN_ENV, ServiceConfig

__all__ = ["add_serve_arguments", "load_token", "main", "run_from_args", "running_server", "serve"]

logger = logging.getLogger("esg_memory.serve")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def load_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token: the file's stripped content if given, else ``$ESG_MEMORY_TOKEN``, else None."""
    if token_file is not None:
        p = Path(token_file)
        try:
            token = p.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token file {str(p)!r}: {e.strerror}") from None
        if hasattr(os, "getuid") and p.stat().st_mode & 0o077:
            logger.warning("token file %s is readable by other users; chmod 600 it", p)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the bearer token must be at least {MIN_TOKEN_CHARS} characters")
    return token


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
    from .serve import create_app

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


def _check_memory_dir(memory_dir: Path) -> bool:
    """True when ``memory_dir`` holds a saved memory; refuses a directory that holds something else."""
    from .durable import is_durable

    saved = (memory_dir / "edited_model.json").is_file() or (memory_dir / "memory.json").is_file() \
        or is_durable(memory_dir)
    if not saved and memory_dir.exists():
        if not memory_dir.is_dir():
            raise ConfigError(f"{memory_dir} is not a directory")
        extra = [p.name for p in memory_dir.iterdir() if p.name != DirectoryLock.FILE]
        if extra:
            held = ", ".join(sorted(extra)[:5])
            raise ConfigError(f"{memory_dir} is not an esg-memory directory (it holds {held})")
    return saved


def _open_model(model_spec: str, clip_spec: str, memory_dir: Path) -> Any:
    from .loading import load_base_model, load_encoder, new_memory
    from .model import EditedModel

    saved = _check_memory_dir(memory_dir)
    encoder = load_encoder(clip_spec)
    base, processor = load_base_model(model_spec)
    memory = memory_dir if saved else new_memory(encoder, clip_spec)
    return EditedModel.wrap(base, processor, memory=memory, encoder=encoder)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options. ``--memory/--model/--clip`` default to SUPPRESS so a parent
    parser's values are not overwritten when this is a subcommand."""
    have = set(getattr(parser, "_option_string_actions", {}))
    for flag, text in (("--memory", "memory directory (created if missing)"),
                       ("--model", "model spec (registered name, local dir or HF id)"),
                       ("--clip", "key-encoder spec")):
        if flag not in have:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=text)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--token-file", help=f"file holding the bearer token (else ${TOKEN_ENV})")
    parser.add_argument("--allowed-root", help="directory image_path fields may point into (else disabled)")
    parser.add_argument("--insecure-local", action="store_true",
                        help="allow writes without a token; forces binding to 127.0.0.1")
    parser.add_argument("--read-only", action="store_true", help="refuse all writes")
    parser.add_argument("--protect-reads", action="store_true", help="require the token for reads too")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                        help="largest request body in MiB (default %(default)s)")
    parser.add_argument("--max-batch-rows", type=int, default=16, help="rows per model call (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=3.0, help="batching window (default 3 ms)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Start the service from parsed arguments (blocks until stopped); returns an exit code."""
    from .loading import DEFAULT_ENCODER, DEFAULT_MODEL

    memory = getattr(args, "memory", None) or os.environ.get("ESG_MEMORY_DIR")
    if not memory:
        raise ConfigError("serve needs --memory DIR (or $ESG_MEMORY_DIR)")
    token = load_token(args.token_file)
    memory_dir = Path(memory)
    # refuse bad configurations before spending time loading models
    if token is None and not (args.insecure_local or args.read_only):
        raise ConfigError(f"refusing to serve writable without a bearer token: set ${TOKEN_ENV} or "
                          "--token-file, or pass --insecure-local (binds 127.0.0.1 only) or --read-only")
    _check_memory_dir(memory_dir)
    model = _open_model(getattr(args, "model", None) or DEFAULT_MODEL, getattr(args, "clip", None)
                        or DEFAULT_ENCODER, memory_dir)
    config = ServiceConfig(max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms)
    serve(model, memory_dir, host=args.host, port=args.port, log_level=args.log_level, token=token,
          allowed_root=args.allowed_root, max_upload_bytes=int(args.max_upload_mb * 2**20),
          insecure_local=args.insecure_local, read_only=args.read_only, protect_reads=args.protect_reads,
          config=config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m esg_memory.serve ...`` (the same options as ``esg-memory serve``)."""
    import sys

    parser = argparse.ArgumentParser(prog="esg-memory serve", description="HTTP service over an edited model")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except EsgMemoryError as e:
        print(f"esg-memory serve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
