"""Command line of ``esg-memory serve`` / ``python -m esg_memory.serve``: options, opening the model, `main`.

The lead's CLI wires it as a subcommand in one line::

    add_serve_arguments(sub.add_parser("serve", help="HTTP service")).set_defaults(
        func=lambda session, args: run_from_args(args))
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import ServiceConfig
from ..errors import ConfigError, EsgMemoryError
from .auth import TOKEN_ENV, load_token, reads_protected
from .directory import check_memory_dir
from .middleware import DEFAULT_MAX_UPLOAD_BYTES
from .server import bind_host, serve

__all__ = ["add_serve_arguments", "main", "run_from_args"]


def open_model(model_spec: str, clip_spec: str, memory_dir: Path | None, store: str | None = None,
               read_only: bool = False, store_config: Any = None, **placement: Any) -> Any:
    """The served `EditedModel`; ``placement``: `model_placement`'s keywords for the base model (the key
    encoder stays on the CPU). ``store``: a ``postgresql://`` URL shared with other replicas (the
    memory is opened there, started from the encoder's default memory when the store is empty)."""
    # imported here: loading pulls in torch and transformers, which `--help` and refusals never need
    from ..loading import load_base_model, load_encoder, new_memory
    from ..memory import EditMemory
    from ..model import EditedModel
    from ..replicas import open_store

    saved = store is None and memory_dir is not None and check_memory_dir(memory_dir)
    encoder = load_encoder(clip_spec)
    base, processor = load_base_model(model_spec, **placement)
    if store is not None:
        memory: Any = open_store(EditMemory, store, encoder, readonly=read_only, config=store_config,
                                 seed=_LazySeed(lambda: new_memory(encoder, clip_spec)))
    else:
        memory = memory_dir if saved else new_memory(encoder, clip_spec)
    return EditedModel.wrap(base, processor, memory=memory, encoder=encoder)


class _LazySeed:
    """The memory a new store starts from, built only when the store is empty."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def snapshot(self) -> Any:
        return self.make().snapshot()


def add_model_arguments(parser: argparse.ArgumentParser, memory_help: str) -> None:
    """The memory and model options ``serve`` and ``ui`` share. They default to SUPPRESS, and those the
    parser already has (a parent's global options) are left alone, so a parent's values are not
    overwritten when this is a subcommand."""
    have = set(getattr(parser, "_option_string_actions", {}))
    for flag, text in (("--memory", memory_help),
                       ("--model", "model spec (registered name, local dir or HF id)"),
                       ("--clip", "key-encoder spec"),
                       ("--device", "base model device, e.g. cuda, cuda:1 (default: where it loads)"),
                       ("--dtype", "base model dtype: float32, float16 or bfloat16 (default: the model's)"),
                       ("--device-map", "transformers device_map (auto, balanced, sequential, a device, or "
                                        "a JSON object); needs esg-memory[accelerate]; excludes --device")):
        if flag not in have:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=text)


def model_from_args(args: argparse.Namespace, memory_dir: Path | None, store: str | None = None,
                    store_config: Any = None) -> Any:
    """`open_model` with the options `add_model_arguments` declares (placement checked before loading)."""
    from ..loading import DEFAULT_ENCODER, DEFAULT_MODEL, model_placement

    placement = model_placement(getattr(args, "device", None), getattr(args, "dtype", None),
                                getattr(args, "device_map", None))
    return open_model(getattr(args, "model", None) or DEFAULT_MODEL,
                      getattr(args, "clip", None) or DEFAULT_ENCODER, memory_dir, store,
                      bool(getattr(args, "read_only", False)), store_config, **placement)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options (`add_model_arguments`'s, then the server's own)."""
    add_model_arguments(parser, "memory directory (created if missing)")
    parser.add_argument("--store", default=os.environ.get("ESG_MEMORY_STORE"),
                        help="postgresql:// URL of a memory shared by several replicas (instead of --memory; "
                             "else $ESG_MEMORY_STORE); needs esg-memory[postgres]")
    parser.add_argument("--staleness-bound", type=float, default=None, metavar="S",
                        help="with --store: seconds of staleness after which /health answers 503 (default 2)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--token-file", help=f"file holding the bearer token (else ${TOKEN_ENV})")
    parser.add_argument("--allowed-root", help="directory image_path fields may point into (else disabled)")
    parser.add_argument("--insecure-local", action="store_true",
                        help="allow writes without a token; forces binding to 127.0.0.1")
    parser.add_argument("--read-only", action="store_true", help="refuse all writes")
    reads = parser.add_mutually_exclusive_group()
    reads.add_argument("--protect-reads", dest="protect_reads", action="store_const", const=True,
                       default=None, help="require the token for reads too (the default beyond loopback)")
    reads.add_argument("--open-reads", dest="protect_reads", action="store_const", const=False,
                       help="serve reads without a token even beyond loopback")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                        help="largest request body in MiB (default %(default)s)")
    parser.add_argument("--max-batch-rows", type=int, default=16, help="rows per model call (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=3.0, help="batching window (default 3 ms)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Start the service from parsed arguments (blocks until stopped); returns an exit code."""
    store = getattr(args, "store", None)
    memory = getattr(args, "memory", None) or (None if store else os.environ.get("ESG_MEMORY_DIR"))
    if store and memory:
        raise ConfigError("pass either --memory DIR or --store postgresql://..., not both")
    if not (memory or store):
        raise ConfigError("serve needs --memory DIR (or $ESG_MEMORY_DIR) or --store postgresql://...")
    if store:
        from ..replicas import is_store_url

        if not is_store_url(store):
            raise ConfigError(f"--store takes a postgresql:// URL, not {store!r}")
    elif args.staleness_bound is not None:
        raise ConfigError("--staleness-bound needs --store")
    token = load_token(args.token_file)
    memory_dir = Path(memory) if memory else None
    # refuse bad configurations before spending time loading models
    if token is None and not (args.insecure_local or args.read_only):
        raise ConfigError(f"refusing to serve writable without a bearer token: set ${TOKEN_ENV} or "
                          "--token-file, or pass --insecure-local (binds 127.0.0.1 only) or --read-only")
    host = bind_host(args.host, args.insecure_local, token)
    reads_protected(host, args.protect_reads, token)
    store_config = None
    if store and args.staleness_bound is not None:
        from ..config import StoreConfig

        # refused before loading models; the poll interval follows a bound below its default
        bound = args.staleness_bound
        store_config = StoreConfig(staleness_bound_s=bound, poll_s=min(StoreConfig.poll_s, bound / 4))
    # placement, then the directory, checked before loading
    model = model_from_args(args, memory_dir, store, store_config)
    config = ServiceConfig(max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms)
    serve(model, memory_dir, host=host, port=args.port, log_level=args.log_level, token=token,
          allowed_root=args.allowed_root, max_upload_bytes=int(args.max_upload_mb * 2**20),
          insecure_local=args.insecure_local, read_only=args.read_only, protect_reads=args.protect_reads,
          config=config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m esg_memory.serve ...`` (the same options as ``esg-memory serve``)."""
    parser = argparse.ArgumentParser(prog="esg-memory serve", description="HTTP service over an edited model")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except EsgMemoryError as e:
        print(f"esg-memory serve: error: {e}", file=sys.stderr)
        return 1
