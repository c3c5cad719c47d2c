"""``esg-memory eval``: its options and what it runs (`esg_memory.cli` registers it and passes its output
function; the global ``--model`` / ``--clip`` / ``--device`` / ``--dtype`` come with the namespace)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..loading import DEFAULT_ENCODER, DEFAULT_MODEL
from .data import DATA_KINDS

__all__ = ["add_eval_arguments", "run_eval_command"]

Emit = Callable[[argparse.Namespace, Any], None]


def add_eval_arguments(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--data", help="JSON file of edit records (not needed for --kind easyvqa or scenes)")
    sp.add_argument("--kind", choices=DATA_KINDS, default="easyvqa", help="record format (default easyvqa)")
    sp.add_argument(
        "--model", dest="eval_model", default=None,
        help="ID|PATH|NAME (default by kind: esg-scenes-llava for scenes, else --model)",
    )
    sp.add_argument(
        "--clip", dest="eval_clip", default=None,
        help="NAME[:WEIGHTS] key encoder (default by kind: esg-easyvqa-clip, esg-scenes-clip, "
        "subject-id+minilm or minilm)",
    )
    sp.add_argument("--edits", type=int, default=100, help="stream length N (> 1000 needs --big)")
    sp.add_argument("--protocol", choices=["immediate", "retention", "both"], default="both")
    sp.add_argument("--out", default="esg-eval-out", help="output directory")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--image-root", help="where the records' image paths resolve (else text-side mode)")
    sp.add_argument("--pool-dir", help="directory with the MMEdit locality pools (default: ../.. of --data)")
    sp.add_argument("--big", action="store_true", help="allow streams over 1000 edits (the 10 000 stream)")
    sp.add_argument("--tune", choices=["sync", "never"], default="sync", help="tune adapters (default sync)")
    sp.add_argument("--batch-size", type=int, default=16, help="most probes per model call (default 16)")
    sp.add_argument("--tune-lr", type=float, default=None, help="tuning learning rate (default: library)")
    sp.add_argument("--tune-steps", type=int, default=None, help="most tuning steps (default: library)")
    sp.add_argument("--tune-examples", type=int, default=None,
                    help="most tuning examples per edit (default: library)")
    sp.add_argument("--tune-patience", type=int, default=None,
                    help="stop tuning an edit after N steps without progress (default: never)")
    sp.add_argument(
        "--immediate-sample", type=int, default=None,
        help="score the immediate protocol on a seeded sample of N edits (default: every edit)",
    )
    sp.add_argument("--revise-rate", type=float, default=0.1, help="revisions per add (default 0.1)")
    sp.add_argument("--delete-rate", type=float, default=0.05, help="deletions per add (default 0.05)")
    sp.add_argument("--methods", help="comma-separated subset of the methods (must include ours)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return sp


def run_eval_command(args: argparse.Namespace, emit: Emit) -> int:
    """Run the harness from parsed options; prints results.md (or a JSON summary with --json)."""
    from .runner import EvalConfig, run_eval

    if args.device_map is not None:
        raise InvalidInputError("eval places the model and the encoder with --device (not --device-map)")

    cfg = EvalConfig(
        kind=args.kind,
        data=args.data,
        image_root=args.image_root,
        pool_dir=args.pool_dir,
        # likewise the global --model: by default each kind gets its world's model
        model=args.eval_model or (args.model if args.model != DEFAULT_MODEL else None),
        # the global --clip has a default; only an explicit choice overrides the per-kind encoder
        clip=args.eval_clip or (args.clip if args.clip != DEFAULT_ENCODER else None),
        edits=args.edits,
        protocol=args.protocol,
        seed=args.seed,
        big=args.big,
        tune=args.tune,
        batch_size=args.batch_size,
        immediate_sample=args.immediate_sample,
        tune_lr=args.tune_lr,
        tune_max_steps=args.tune_steps,
        tune_examples=args.tune_examples,
        tune_patience=args.tune_patience,
        revise_rate=args.revise_rate,
        delete_rate=args.delete_rate,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else EvalConfig.methods,
        device=args.device or "cpu",  # the global --device / --dtype
        dtype=args.dtype,
    )
    res = run_eval(cfg, Path(args.out), progress=not (args.json or args.no_progress))
    if args.json:
        keys = ("reliability", "t_gen", "i_gen", "t_loc", "m_loc", "portability", "audit")
        summary = {
            m: {p: ({k: v[p][k] for k in keys} if v[p] else None) for p in ("immediate", "retention")}
            for m, v in res["methods"].items()
        }
        emit(args, {"out": str(args.out), "files": res["files"], "methods": summary})
    else:
        print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
        print(f"wrote {', '.join(res['files'])} to {args.out}")
    return 0
