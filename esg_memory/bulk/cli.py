"""``esg-memory import`` and ``esg-memory export``: their options and what they run (`esg_memory.cli`
registers them and passes its session — the memory, the model, saving — and its output function)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .apply import apply_batch
from .export import export_memory
from .formats import FORMATS, read_file

__all__ = ["add_export_arguments", "add_import_arguments", "run_export", "run_import"]

Emit = Callable[[argparse.Namespace, Any], None]


def add_import_arguments(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("file", help="JSONL (an edit per line), or MMEdit, VLKEB, zsRE, CounterFact records")
    sp.add_argument("--format", choices=FORMATS, default="jsonl", help="the file's format (default jsonl)")
    sp.add_argument("--image-root", help="where image paths resolve (default: the file's folder)")
    sp.add_argument("--limit", type=int, default=None, help="import the first N edits only")
    sp.add_argument("--with-model", action="store_true", help="store each edit's compiled adapter (--model)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return sp


def add_export_arguments(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("dest", help="a .jsonl file or a folder (edits.jsonl); images go to images/ beside it")
    return sp


def run_import(session: Any, args: argparse.Namespace, emit: Emit) -> int:
    """Check every record (images decoded) before the memory is even loaded, add them as one write, save."""
    bar = not (args.json or args.no_progress)
    records = read_file(args.file, args.format, image_root=args.image_root, limit=args.limit, progress=bar)
    res = apply_batch(session.model if args.with_model else session.memory, records, progress=bar)
    session.save()
    out = res.to_dict()
    emit(args, out if args.json else {k: v for k, v in out.items() if k != "ids"})
    return 0


def run_export(session: Any, args: argparse.Namespace, emit: Emit) -> int:
    emit(args, export_memory(session.memory, args.dest).to_dict())
    return 0
