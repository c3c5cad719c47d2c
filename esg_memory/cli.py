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

from .config import MODEL_DTYPES, TUNE_MODES
from .errors import EsgMemoryError, InvalidInputError
from .loading import DEFAULT_ENCODER, DEFAULT_MODEL, new_memory

__all__ = ["build_parser", "main"]

log = logging.getLogger("esg_memory.cli")

#: Exit codes: 0 ok, 1 refused by the library (bad input, unknown id, ...), 2 usage, 3 unexpected failure.
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3

BENCHMARKS = (
    "index", "routing", "fusion", "wrapper", "service", "default", "memory_scale", "journal", "reliability",
    "replicas", "cost_curve",
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

            self._encoder = load_encoder(self.args.clip, device=self.args.device)
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
    def loaded_model(self):
        """The model if a command loaded it (None: it worked on the memory alone)."""
        return self._model

    @property
    def model(self):
        if self._model is None:
            from .loading import load_base_model
            from .model import EditedModel

            base, processor = load_base_model(self.args.model, **self.placement())
            log.debug("model %s loaded on %s as %s", self.args.model, base.device, base.dtype)
            self._model = EditedModel.wrap(base, processor, memory=self.memory, encoder=self.encoder)
        return self._model

    def placement(self) -> dict[str, Any]:
        """--device / --dtype / --device-map as `load_base_model` keywords (checked before any load)."""
        from .loading import model_placement

        a = self.args
        return model_placement(a.device, a.dtype, a.device_map)

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


def _examples(texts: list[str] | None, images: list[str] | None) -> list:
    """``--positive`` / ``--negative`` texts, then ``--*-image`` paths as (image, None) pairs."""
    return [*(texts or []), *((p, None) for p in (images or []))]


def cmd_add(s: _Session, args: argparse.Namespace) -> int:
    kwargs = dict(
        image=args.image,
        question=args.question,
        answer=args.answer,
        positives=_examples(args.positive, args.positive_image),
        negatives=_examples(args.negative, args.negative_image) or None,
        metadata=json.loads(args.metadata) if args.metadata else {},
    )
    if args.tune != "never" or args.with_model:
        eid = s.model.add_edit(tune=args.tune, **kwargs)
        _finish_jobs(s, eid)
    else:
        eid = s.memory.add(**kwargs)
    s.save()
    _emit(args, {"edit_id": eid, "version": s.memory.get(eid).version, **_status(s, eid)})
    return EXIT_OK


def _finish_jobs(s: _Session, eid: int) -> None:
    """A one-shot process runs an edit's check and tuning (``auto`` / ``background``) in the foreground: it
    waits for them before saving. A failed tuning leaves the edit with its compiled adapter; it is logged
    and shown (``tuning: failed``), not an error of the write, which is done."""
    try:
        s.model.wait_for_tuning()
    except Exception as exc:  # recorded in the edit's status by the job, and printed below
        log.warning("edit %d: tuning failed (%s: %s)", eid, type(exc).__name__, exc)


def _status(s: _Session, eid: int) -> dict[str, Any]:
    """``gives_answer`` / ``tuning`` of the edit's current version: this process's when it loaded the model,
    else what its stored adapter tells (`esg_memory.model.status.derived_status`)."""
    if s.loaded_model is not None:
        return s.loaded_model.edit_status(eid).to_dict()
    from .model import ADAPTER_KIND
    from .model.status import derived_status

    edit = s.memory.get(eid)
    stored = s.memory.attachment(eid, ADAPTER_KIND, version=edit.version)
    return derived_status(eid, edit.version, stored).to_dict()


def cmd_delete(s: _Session, args: argparse.Namespace) -> int:
    for eid in args.edit_ids:
        s.memory.delete(eid)
    s.save()
    _emit(args, {"deleted": args.edit_ids})
    return EXIT_OK


def cmd_revise(s: _Session, args: argparse.Namespace) -> int:
    changes = dict(
        answer=args.answer, question=args.question, image=args.image,
        positives=_examples(args.positive, args.positive_image) or None,
    )
    if args.tune != "never" or args.with_model:
        version = s.model.revise_edit(args.edit_id, tune=args.tune, **changes)
        _finish_jobs(s, args.edit_id)
    else:
        version = s.memory.revise(args.edit_id, **changes)
    s.save()
    _emit(args, {"edit_id": args.edit_id, "version": version, **_status(s, args.edit_id)})
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
    _emit(args, {**_edit_dict(s.memory.get(args.edit_id)), **_status(s, args.edit_id)})
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


def _benchmarks_dir(args: argparse.Namespace) -> Path:
    """The benchmarks/ folder of a source checkout: --benchmarks, else $ESG_MEMORY_BENCHMARKS, else the one
    beside this package (an editable install). A wheel has none: the scripts read and write the checkout's
    results/ and import its helper modules, so they ship with the source tree, not the distribution."""
    given = args.benchmarks or os.environ.get("ESG_MEMORY_BENCHMARKS")
    where = Path(given) if given else Path(__file__).resolve().parent.parent / "benchmarks"
    if not (where / "bench_index.py").is_file():
        raise InvalidInputError(
            f"no benchmark scripts in {where}: `esg-memory bench` runs a source checkout's benchmarks/ "
            "(not shipped in the wheel); pass --benchmarks DIR or set $ESG_MEMORY_BENCHMARKS to a "
            "checkout's benchmarks/ folder, or install from a clone with `pip install -e .[all]`"
        )
    return where


def cmd_migrate(s: _Session, args: argparse.Namespace) -> int:
    """Move a memory between a directory and a PostgreSQL store (either way); routing is identical."""
    from .memory import EditMemory
    from .replicas import is_store_url, migrate

    src, dst = args.source, args.target
    # refused before the encoder loads (seconds): the same checks `migrate` makes
    if is_store_url(src) == is_store_url(dst):
        raise InvalidInputError("migrate moves a memory between a directory and a postgresql:// store")
    if not is_store_url(dst) and Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())):
        raise InvalidInputError(f"{dst} is not empty; migrate into a new directory")
    if not is_store_url(src) and (Path(src) / "memory").is_dir():
        src = str(Path(src) / "memory")  # the wrapper / serve layout: DIR/memory
    n = migrate(EditMemory, src, dst, encoder=s.encoder)
    _emit(args, {"source": args.source, "target": args.target, "edits": n})
    return 0


def cmd_bench(s: _Session, args: argparse.Namespace) -> int:
    script = _benchmarks_dir(args) / f"bench_{args.name}.py"
    if not script.is_file():
        raise InvalidInputError(f"benchmark script not found: {script}")
    module = runpy.run_path(str(script), run_name="esg_memory_bench")
    rc = module["main"](list(args.bench_args))
    return int(rc or 0)


def cmd_demo(s: _Session, args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(
        out_dir=Path(args.out), model=args.model, clip=args.clip, echo=lambda line: print(line, flush=True),
        placement=s.placement(), encoder_device=args.device,
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
    p.add_argument("--device", default=d(None), help="model and key encoder device (cuda, cuda:1, cpu)")
    p.add_argument("--dtype", choices=MODEL_DTYPES, default=d(None), help="model dtype (default: its own)")
    p.add_argument(
        "--device-map", default=d(None),
        help="transformers device_map for the model (auto, balanced, sequential, a device, or a JSON "
        "object); needs esg-memory[accelerate]; excludes --device",
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

    def tune_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--tune", choices=TUNE_MODES, default="auto",
            help="auto (default): load --model, check that the edit's own input gets its answer and tune "
            "the adapter if not, before exiting; sync/background: always tune; never: write the edit "
            "only (no model loaded unless --with-model)",
        )
        sp.add_argument("--with-model", action="store_true", help="--tune never: still compile the adapter")

    def edit_fields(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--image", help="image file (path)")
        sp.add_argument("--question", required=required, help="question / prompt the edit answers")
        sp.add_argument("--answer", required=required, help="the new answer")
        sp.add_argument("--positive", action="append", help="a rephrasing that must also get the answer")
        sp.add_argument("--positive-image", action="append", help="another image of the same subject")

    sp = command("add", help="add an edit (live at once)")
    edit_fields(sp, required=True)
    sp.add_argument("--negative", action="append",
                    help="a question about this image that must NOT get the answer")
    sp.add_argument("--negative-image", action="append",
                    help="an image on which this question must NOT get the answer (a look-alike)")
    sp.add_argument("--metadata", help="JSON object stored with the edit")
    tune_options(sp)
    sp.set_defaults(func=cmd_add)

    sp = command("delete", help="delete edits (exact: as if never added)")
    sp.add_argument("edit_ids", type=int, nargs="+")
    sp.set_defaults(func=cmd_delete)

    sp = command("revise", help="correct an edit: a new version supersedes the old")
    sp.add_argument("edit_id", type=int)
    edit_fields(sp, required=False)
    tune_options(sp)
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
    sp.add_argument("--benchmarks", help="a checkout's benchmarks/ (else $ESG_MEMORY_BENCHMARKS)")
    sp.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    sp.set_defaults(func=cmd_bench)

    _add_bulk_parsers(command)

    sp = command("migrate", help="move a memory between a directory and a postgresql:// store (either way)")
    sp.add_argument("source", help="memory directory, or postgresql:// URL")
    sp.add_argument("target", help="postgresql:// URL of an empty database, or a new directory")
    sp.set_defaults(func=cmd_migrate)

    from .serve.cli import add_serve_arguments, run_from_args

    sp = add_serve_arguments(command("serve", help="HTTP service (needs the [serve] extra)"))
    sp.set_defaults(func=lambda s, a: run_from_args(a))
    from .serve.ui.cli import add_ui_arguments, run_ui_from_args

    sp = add_ui_arguments(command("ui", help="edit debugger in the browser over a memory, read-only"))
    sp.set_defaults(func=lambda s, a: run_ui_from_args(a))

    basic = argparse.ArgumentParser(add_help=False)
    _global_options(basic, defaults=False, model=False)
    _add_eval_parser(sub, basic)

    sp = command("demo", help="the product's story on the embedded default models")
    sp.add_argument("--out", default="esg-demo-out", help="where the report goes")
    sp.set_defaults(func=cmd_demo)
    return p


def _add_bulk_parsers(command: Any) -> None:
    from .bulk.cli import add_export_arguments, add_import_arguments, run_export, run_import

    sp = add_import_arguments(command("import", help="add a file's edits at once, all or none"))
    sp.set_defaults(func=lambda s, a: run_import(s, a, _emit))
    sp = add_export_arguments(command("export", help="write the edits as JSONL with their images beside it"))
    sp.set_defaults(func=lambda s, a: run_export(s, a, _emit))


def _add_eval_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    from .eval.cli import add_eval_arguments, run_eval_command

    sp = sub.add_parser(
        "eval",
        parents=[parent],
        help="evaluation harness: EasyEdit-style metrics, edit streams, baselines (docs/eval.md)",
    )
    add_eval_arguments(sp).set_defaults(func=lambda s, a: run_eval_command(a, _emit))


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
