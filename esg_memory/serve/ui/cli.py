"""``esg-memory ui --memory DIR [--eval RUN] [--port P]``: the edit debugger (``/ui``) over a local memory,
read-only, with an eval run's audit.

It loads the memory and the model as ``serve`` does, builds a read-only app bound to 127.0.0.1 (reads are
open on loopback, no write is accepted, the directory is not locked, so a running ``serve`` may keep
writing to it), prints the page's URL and serves until Ctrl-C. ``--port 0`` picks a free port.
``--eval RUN`` (an ``esg-memory eval --out`` directory) adds its audit (the page's Audit view); with
``--eval`` and no memory only the audit is served, and no model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ...errors import ConfigError
from ..directory import check_memory_dir

__all__ = ["add_ui_arguments", "run_ui_from_args"]

HOST = "127.0.0.1"


def add_ui_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ui`` options (``--memory/--model/--clip/--device/--dtype/--device-map`` come from the
    parent parser when it has them, as for ``serve``)."""
    from ..cli import add_model_arguments

    add_model_arguments(parser, "memory directory (must exist)")
    parser.add_argument("--eval", dest="eval_dir", metavar="RUN", default=None,
                        help="an `esg-memory eval --out` directory: its audit in the Audit view (alone: "
                             "only the audit, no model loaded)")
    parser.add_argument("--port", type=int, default=8765,
                        help="port on 127.0.0.1 (default 8765; 0: any free)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def run_ui_from_args(args: argparse.Namespace) -> int:
    """Serve the debugger over ``args.memory`` (and/or the audit of ``args.eval_dir``) read-only on
    127.0.0.1 until interrupted; returns 0."""
    from ..app import create_app
    from ..cli import model_from_args
    from ..server import running_server

    memory = getattr(args, "memory", None) or os.environ.get("ESG_MEMORY_DIR")
    eval_dir = getattr(args, "eval_dir", None)
    if not memory and not eval_dir:
        raise ConfigError("ui needs --memory DIR (or $ESG_MEMORY_DIR), --eval RUN, or both")
    if not 0 <= int(args.port) < 65536:
        raise ConfigError("--port must be in 0..65535")
    if not memory:
        from .audit_routes import create_audit_app

        app = create_audit_app(eval_dir, host=HOST)
        what = f"the audit of {Path(eval_dir).resolve().name}"
    else:
        memory_dir = Path(memory)
        if not check_memory_dir(memory_dir):
            raise ConfigError(f"no saved memory in {str(memory_dir)!r}: `esg-memory ui` opens an "
                              "existing one")
        if eval_dir:
            from .audit import EvalAudit

            EvalAudit(eval_dir)  # a bad run directory is refused before the model loads
        model = model_from_args(args, memory_dir)
        app = create_app(model, memory_dir, read_only=True, host=HOST, eval_dir=eval_dir)
        what = f"{len(model.memory)} edits"
        if eval_dir:
            what += f", the audit of {Path(eval_dir).resolve().name}"
    with running_server(app, HOST, int(args.port), log_level=args.log_level) as url:
        sys.stdout.write(f"esg-memory ui: {url}/ui  (read-only, {what}; Ctrl-C stops)\n")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
