"""`esg-memory` command line: a thin shell over the library.

Every command works on one memory directory (``--memory DIR``). Errors are one line on
stderr with a non-zero exit code; ``--debug`` shows the traceback; ``--json`` prints
machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import EsgMemoryError, InvalidInputError
from .loading import DEFAULT_ENCODER, DEFAULT_MODEL, new_memory

__all__ = ["build_parser", "main"]

log = logging.getLogger("esg_memory.cli")

#: Exit codes: 0 ok, 1 refused by the library (bad input, unknown id, ...), 2 usage, 3 unexpected failure.
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3

BENCHMARKS = (
    "index", "routing", "fusion", "wrapper", "service", "default", "memory_scale", "journal", "reliability",
)


# --------------------------------------------------------------------------- session


class _Session:
    """Lazily builds the encoder, memory and model a command needs, and nothing more."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._encoder = None
        self._memory = None
        self._model = None

    @property
    def encoder(self):
        if self._encoder is None:
            from .loading import load_encoder

            self._encoder = load_encoder(self.args.clip)
        return self._encoder

    @property
    def memory_dir(self) -> Path:
        if not self.args.memory:
            raise InvalidInputError("this command needs --memory DIR (or ESG_MEMORY_DIR)")
        return Path(self.args.memory)

    @property
    def memory(self):
        """The memory in DIR: the wrapper layout (DIR/memory/) or a plain ``EditMemory.save`` directory."""
        if self._memory is None:
            from .memory import EditMemory

            d = self.memory_dir
            if (d / "memory").is_dir():
                self._memory = EditMemory.load(d / "memory", encoder=self.encoder)
            elif d.is_dir() and any(d.iterdir()):
                self._memory = EditMemory.load(d, encoder=self.encoder)
            else:
                self._memory = new_memory(self.encoder, self.args.clip)
        return self._memory

    @property
    def model(self):
        if self._model is None:
            from .loading import load_base_model
            from .model import EditedModel

            base, processor = load_base_model(self.args.model)
            self._model = EditedModel.wrap(base, processor, memory=self.memory, encoder=self.encoder)
        return self._model

    def save(self) -> None:
        d = self.memory_dir
        if self._model is not None:
            self._model.save(d)
        elif (d / "memory").is_dir() or not d.exists() or not any(d.iterdir()):
            self.memory.save(d / "memory")
        else:
            self.memory.save(d)


# --------------------------------------------------------------------------- output


def _edit_dict(edit) -> dict[str, Any]:
    return edit.to_dict() if hasattr(edit, "to_dict") else dict(vars(edit))


def _emit(
    args: argparse.Namespace,
    payload: Any,
    table: list[list[Any]] | None = None,
    header: Sequence[str] | None = None,
) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
        return
    if table is not None and header is not None:
        print(_markdown_table(header, table))
    elif isinstance(payload, dict):
        width = max((len(k) for k in payload), default=0)
        for k, v in payload.items():
            print(f"{k:<{width}}  {v}")
    else:
        print(payload)


def _markdown_table(header: Sequence[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


# --------------------------------------------------------------------------- commands


def _positives(args: argparse.Namespace) -> list:
    pos: list = list(args.positive or [])
    pos += [(p, None) for p in (args.positive_image or [])]
    return pos


def cmd_add(s: _Session, args: argparse.Namespace) -> int:
    kwargs = dict(
        image=args.image,
        question=args.question,
        answer=args.answer,
        positives=_positives(args),
        metadata=json.loads(args.metadata) if args.metadata else {},
    )
    if args.tune != "never" or args.with_model:
        eid = s.model.add_edit(tune=args.tune, **kwargs)
    else:
        eid = s.memory.add(**kwargs)
    s.save()
    _emit(args, {"edit_id": eid, "version": s.memory.get(eid).version})
    return EXIT_OK


def cmd_delete(s: _Session, args: argparse.Namespace) -> int:
    for eid in args.edit_ids:
        s.memory.delete(eid)
    s.save()
    _emit(args, {"deleted": args.edit_ids})
    return EXIT_OK


def cmd_revise(s: _Session, args: argparse.Namespace) -> int:
    version = s.memory.revise(
        args.edit_id,
        answer=args.answer,
        question=args.question,
        image=args.image,
        positives=_positives(args) or None,
    )
    s.save()
    _emit(args, {"edit_id": args.edit_id, "version": version})
    return EXIT_OK


def cmd_rollback(s: _Session, args: argparse.Namespace) -> int:
    version = s.memory.rollback(args.edit_id, args.version)
    s.save()
    _emit(args, {"edit_id": args.edit_id, "restored": args.version, "version": version})
    return EXIT_OK


def cmd_list(s: _Session, args: argparse.Namespace) -> int:
    edits = s.memory.list()
    rows = [[e.id, e.version, e.question, e.answer, (e.image or "-")[:12]] for e in edits]
    _emit(args, [_edit_dict(e) for e in edits], rows, ["id", "version", "question", "answer", "image"])
    return EXIT_OK


def cmd_show(s: _Session, args: argparse.Namespace) -> int:
    _emit(args, _edit_dict(s.memory.get(args.edit_id)))
    return EXIT_OK


def cmd_history(s: _Session, args: argparse.Namespace) -> int:
    hist = s.memory.history(args.edit_id)
    rows = [[v.version, v.question, v.answer, getattr(v, "reason", "")] for v in hist]
    _emit(args, [_edit_dict(v) for v in hist], rows, ["version", "question", "answer", "note"])
    return EXIT_OK


def cmd_route(s: _Session, args: argparse.Namespace) -> int:
    r = s.memory.route(images=[args.image], texts=[args.question])
    payload = {
        "edit_id": int(r.edit_ids[0]),
        "score": float(r.scores[0]),
        "threshold": float(r.thresholds[0]),
        "margin": float(r.margins[0]),
        "runner_up": int(r.runner_up[0]),
        "explain": r.explain(0),
    }
    _emit(args, payload)
    return EXIT_OK


def cmd_generate(s: _Session, args: argparse.Namespace) -> int:
    images = [args.image] if args.image else None
    route = s.model.retrieve(images, [args.prompt])[0]
    text = s.model.answer(images, [args.prompt], max_new_tokens=args.max_new_tokens)[0]
    _emit(args, {"text": text, "edit_id": route.edit_id, "why": route.explanation})
    return EXIT_OK


def cmd_bench(s: _Session, args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.name}.py"
    if not script.is_file():
        raise InvalidInputError(
            f"benchmark script not found: {script} (benchmarks ship with the source tree)"
        )
    module = runpy.run_path(str(script), run_name="esg_memory_bench")
    rc = module["main"](list(args.bench_args))
    return int(rc or 0)


def cmd_eval(s: _Session, args: argparse.Namespace) -> int:
    from .eval import EvalConfig, run_eval

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
        revise_rate=args.revise_rate,
        delete_rate=args.delete_rate,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else EvalConfig.methods,
        device=args.device,
        dtype=args.dtype,
    )
    res = run_eval(cfg, Path(args.out), progress=not (args.json or args.no_progress))
    if args.json:
        keys = ("reliability", "t_gen", "i_gen", "t_loc", "m_loc", "portability", "audit")
        summary = {
            m: {p: ({k: v[p][k] for k in keys} if v[p] else None) for p in ("immediate", "retention")}
            for m, v in res["methods"].items()
        }
        _emit(args, {"out": str(args.out), "files": res["files"], "methods": summary})
    else:
        print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
        print(f"wrote {', '.join(res['files'])} to {args.out}")
    return EXIT_OK


def cmd_demo(s: _Session, args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(
        out_dir=Path(args.out), model=args.model, clip=args.clip, echo=lambda line: print(line, flush=True)
    )
    return EXIT_OK if report.passed else EXIT_REFUSED


# --------------------------------------------------------------------------- parser


def _global_options(p: argparse.ArgumentParser, defaults: bool, model: bool = True) -> None:
    """The options every command takes, before or after the command's name.

    On the main parser they carry the defaults; on each command's parser (``defaults=False``) they are
    ``SUPPRESS``ed, so a value given after the command overrides one given before it and an absent one
    leaves it alone. ``model``: also --model / --clip (``eval`` has its own, with other defaults).
    """

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--memory", default=d(os.environ.get("ESG_MEMORY_DIR")), help="memory directory")
    if model:
        p.add_argument(
            "--model",
            default=d(DEFAULT_MODEL),
            help="HF model id, local model dir, or 'tiny-llava' (embedded default)",
        )
        p.add_argument(
            "--clip",
            default=d(DEFAULT_ENCODER),
            help="key encoder: open_clip name[:weights file], 'esg-tiny-clip', or 'minilm+<clip>'",
        )
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON")
    p.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="esg-memory",
        description="Scoped, instantly editable memory of corrections for a frozen multimodal LLM.",
    )
    _global_options(p, defaults=True)
    every = argparse.ArgumentParser(add_help=False)
    _global_options(every, defaults=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[every], **kw)

    def edit_fields(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--image", help="image file (path)")
        sp.add_argument("--question", required=required, help="question / prompt the edit answers")
        sp.add_argument("--answer", required=required, help="the new answer")
        sp.add_argument("--positive", action="append", help="a rephrasing that must also get the answer")
        sp.add_argument("--positive-image", action="append", help="another image of the same subject")

    sp = command("add", help="add an edit (live at once)")
    edit_fields(sp, required=True)
    sp.add_argument("--metadata", help="JSON object stored with the edit")
    sp.add_argument("--tune", choices=["never", "sync"], default="never", help="tune the adapter now")
    sp.add_argument("--with-model", action="store_true", help="compile the adapter with --model now")
    sp.set_defaults(func=cmd_add)

    sp = command("delete", help="delete edits (exact: as if never added)")
    sp.add_argument("edit_ids", type=int, nargs="+")
    sp.set_defaults(func=cmd_delete)

    sp = command("revise", help="correct an edit: a new version supersedes the old")
    sp.add_argument("edit_id", type=int)
    edit_fields(sp, required=False)
    sp.set_defaults(func=cmd_revise)

    sp = command("rollback", help="restore an earlier version of an edit")
    sp.add_argument("edit_id", type=int)
    sp.add_argument("--version", type=int, required=True)
    sp.set_defaults(func=cmd_rollback)

    command("list", help="list edits").set_defaults(func=cmd_list)
    for name, fn, text in (
        ("show", cmd_show, "show one edit"),
        ("history", cmd_history, "versions of an edit"),
    ):
        sp = command(name, help=text)
        sp.add_argument("edit_id", type=int)
        sp.set_defaults(func=fn)

    sp = command("route", help="explain which edit (if any) covers an input")
    sp.add_argument("--image")
    sp.add_argument("--question")
    sp.set_defaults(func=cmd_route)

    sp = command("generate", help="answer with the edited model")
    sp.add_argument("--image")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=16)
    sp.set_defaults(func=cmd_generate)

    sp = command("bench", help="run a benchmark: " + ", ".join(BENCHMARKS))
    sp.add_argument("name", choices=BENCHMARKS)
    sp.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    sp.set_defaults(func=cmd_bench)

    from .serve.cli import add_serve_arguments, run_from_args

    sp = add_serve_arguments(command("serve", help="HTTP service (needs the [serve] extra)"))
    sp.set_defaults(func=lambda s, a: run_from_args(a))

    basic = argparse.ArgumentParser(add_help=False)
    _global_options(basic, defaults=False, model=False)
    _add_eval_parser(sub, basic)

    sp = command("demo", help="the product's story on the embedded default models")
    sp.add_argument("--out", default="esg-demo-out", help="where the report goes")
    sp.set_defaults(func=cmd_demo)
    return p


def _add_eval_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    from .eval.data import DATA_KINDS

    sp = sub.add_parser(
        "eval",
        parents=[parent],
        help="evaluation harness: EasyEdit-style metrics, edit streams, baselines (docs/eval.md)",
    )
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
    sp.add_argument(
        "--immediate-sample", type=int, default=None,
        help="score the immediate protocol on a seeded sample of N edits (default: every edit)",
    )
    sp.add_argument("--revise-rate", type=float, default=0.1, help="revisions per add (default 0.1)")
    sp.add_argument("--delete-rate", type=float, default=0.05, help="deletions per add (default 0.05)")
    sp.add_argument("--methods", help="comma-separated subset of the methods (must include ours)")
    sp.add_argument("--device", default="cpu", help="model and encoder device, e.g. cuda (default cpu)")
    sp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (HF models)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_eval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(_Session(args), args)
    except EsgMemoryError as e:
        if args.debug:
            raise
        print(f"esg-memory: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, json.JSONDecodeError) as e:
        if args.debug:
            raise
        print(f"esg-memory: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
