"""Reliability report: hostile inputs refused, concurrent reads checked, crashes survived.

Three parts, each a pass/fail count rather than a speed:

1. **Bad inputs** — the fuzz catalogue of ``tests/_fuzz_fixtures.py`` (ids, texts, images, arrays,
   argument structures on `EditMemory`; `load_image` with ``..``/symlink escapes; `ScopedIndex`;
   `EditedModel` on the tiny LLaVA; the tiny CLIP encoder), damaged memory, index and encoder
   directories (``tests/_fuzz_files.py``: truncation, foreign and newer formats, traversal names,
   ``--flips`` seeded random bit flips; durable directories: flips and cuts in the journal and
   snapshot; CLIP directories: bad configs, allocation bombs, a malicious pickle as weights), and
   ``--random`` seeded random byte strings and damaged PNGs given as images. Each case must raise a
   typed error (`EsgMemoryError`, or `ScopedIndexError` for the index) and leave the state it was
   called on unchanged (a full fingerprint before and after); a random flip may instead load into
   exactly the pristine state (the bit carried no data), and damage inside a durable directory's
   last journal record may drop just that record (the journal's torn-write rule). Reported: cases
   tried and how each category was refused, by error type.
2. **Concurrency** — ``tests/_concurrency_oracle.py``: writer threads add, revise and delete edits
   while others route and generate; every read is checked against a serial replay of the writes
   (``--concurrency-seeds`` runs). Reported: operations checked, violations, thread errors.
3. **Crashes** — ``benchmarks/_crash.py``: a writer process SIGKILLed at random moments
   (``--trials``); after each, the memory is reloaded and every acknowledged edit must be there.
   Reported: trials, kills, acknowledged writes, edits lost (must be 0), partial writes (must be 0).

    python benchmarks/bench_reliability.py            # 24 crash trials, 48 flips, 3 concurrency seeds
    python benchmarks/bench_reliability.py --quick    # 6 crash trials, 16 flips, 1 seed (< 1 min)

Writes ``reliability.{md,json}`` (``reliability_quick.*`` with --quick) to ``--out``; exits 1 when any
case fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests._fuzz_fixtures import (  # noqa: E402
    Outcome,
    fuzz_index,
    fuzz_memory,
    image_cases,
    index_cases,
    index_state,
    memory_cases,
    memory_state,
    run_case,
    summarize,
)
from tests._memory_fixtures import png_bytes, shape_image  # noqa: E402

logger = logging.getLogger("bench_reliability")


def _random_images(n: int, seed: int) -> list[Outcome]:
    """Random byte strings and randomly damaged PNGs as images: refused, or decoded into a valid RGB image."""
    from esg_memory.errors import ImageError
    from esg_memory.images import load_image

    rng = random.Random(seed)
    good = bytearray(png_bytes(shape_image("red")))
    out = []
    for i in range(n):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2048)))
            cat = "random bytes"
        else:
            b = bytearray(good)
            for _ in range(rng.randrange(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b[: rng.randrange(1, len(b) + 1)] if rng.random() < 0.5 else b)
            cat = "damaged PNGs"
        try:
            img = load_image(data).image
            ok, raised, msg = img.mode == "RGB" and img.width > 0, "decoded (valid image)", "decoded"
        except ImageError as e:
            ok, raised, msg = True, "ImageError", str(e)
        except Exception as e:  # a finding
            ok, raised, msg = False, type(e).__name__, f"untyped {type(e).__name__}: {e}"
        out.append(Outcome(cat, f"{cat} #{i}", raised, ok, True, msg[:200]))
    return out


def run_fuzz(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], float]:
    from tests._fuzz_files import loader_cases
    from tests._fuzz_model import model_cases
    from tests._model_fixtures import tiny

    t0 = time.perf_counter()
    outcomes: list[Outcome] = []
    mem, info = fuzz_memory()
    for c in memory_cases(mem, info, work / "memory"):
        outcomes.append(run_case(c, lambda: memory_state(mem)))
    for c in image_cases(work / "images"):
        outcomes.append(run_case(c, lambda: ""))
    ix = fuzz_index()
    for c in index_cases(ix, work / "index"):
        outcomes.append(run_case(c, lambda: index_state(ix)))
    for c in loader_cases(mem, work / "files", seed=args.seed, n_flips=args.flips):
        outcomes.append(run_case(c, lambda: memory_state(mem)))
    try:
        from tests._fuzz_files import durable_cases

        for c in durable_cases(work / "durable", seed=args.seed, n_flips=args.flips):
            outcomes.append(run_case(c, lambda: ""))
    except ImportError:  # a tree without the durable journal
        pass
    outcomes += _random_images(args.random, args.seed)

    from esg_memory.memory import EditMemory
    from esg_memory.model import EditedModel
    from tests._fuzz_fixtures import CFG
    from tests._memory_fixtures import HashKeyEncoder

    model, proc = tiny("llava")
    em = EditedModel.wrap(model, proc, EditMemory(HashKeyEncoder(32), CFG))
    img = shape_image("red")
    em.add_edit(img, "what color is the shape?", "purple", tune="never")
    for c in model_cases(em, img, work / "model"):
        outcomes.append(run_case(c, lambda: memory_state(em.memory)))
    from tests._fuzz_model import encoder_cases, encoder_state
    from tests._model_fixtures import tiny_encoder

    enc = tiny_encoder()
    for c in encoder_cases(enc, work / "encoder"):
        outcomes.append(run_case(c, lambda: encoder_state(enc)))
    from tests._fuzz_model import encoder_dir_cases

    dir_cases, marker = encoder_dir_cases(work / "encoder-dirs")
    for c in dir_cases:
        outcomes.append(run_case(c, lambda: ""))
    if marker.exists():  # a pickled payload in a weights file ran: the worst possible finding
        outcomes.append(Outcome("encoder files", "pickle executed", "EXECUTED", False, False, "code ran"))
    return summarize(outcomes), time.perf_counter() - t0


def run_concurrency(args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    from tests._concurrency_oracle import run_concurrency_check
    from tests._model_fixtures import tiny

    t0 = time.perf_counter()
    model, proc = tiny("llava")
    total: dict[str, Any] = {"runs": 0, "errors": [], "violations": []}
    for s in range(args.concurrency_seeds):
        rep = run_concurrency_check(model, proc, seed=args.seed + s).to_dict()
        total["runs"] += 1
        for k, v in rep.items():
            if isinstance(v, list):
                total[k] = total.get(k, []) + v
            else:
                total[k] = total.get(k, 0) + v
    return total, time.perf_counter() - t0


def run_crashes(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _crash import run_crash_trials
    except ImportError as e:  # the durable journal is not in this tree
        return {"error": f"crash harness unavailable: {e}"}, 0.0
    stats = run_crash_trials(args.trials, args.seed, work / "crash")
    return stats, time.perf_counter() - t0


def render(report: dict[str, Any]) -> str:
    lines = [f"# Reliability ({'quick' if report['quick'] else 'full'} run)", ""]
    fz = report["fuzz"]
    lines += [
        "## Bad inputs: refused with a typed error, state unchanged",
        "",
        "| category | tried | refused cleanly | how (error type: count) |",
        "|---|---|---|---|",
    ]
    for cat, s in fz.items():
        how = ", ".join(f"{k}: {v}" for k, v in sorted(s["by_error"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {cat} | {s['tried']} | {s['refused']} | {how} |")
    tried = sum(s["tried"] for s in fz.values())
    refused = sum(s["refused"] for s in fz.values())
    lines.append(f"| **all** | **{tried}** | **{refused}** | |")
    lines += [
        "",
        "`IdenticalLoad`: a randomly damaged copy loaded exactly the undamaged state (the bit carried no "
        "data). `TornTailDropped`: damage inside a durable directory's last journal record loaded the state "
        "before that write — the journal reads it as a torn write, so a bit flip there loses that one "
        "(acknowledged) write; `decoded (valid image)`: damaged PNG bytes that still decode to a valid "
        "image.",
    ]
    failed = [f for s in fz.values() for f in s["failed"]]
    if failed:
        lines += ["", "Not refused cleanly:", "", *[f"- {f}" for f in failed[:50]]]
    cc = report["concurrency"]
    lines += [
        "",
        "## Concurrency: every read explained by a serial state within its window",
        "",
        "| runs | writes | routes checked | generations checked | with an edit injected | ops checked "
        "| violations | thread errors |",
        "|---|---|---|---|---|---|---|---|",
        f"| {cc['runs']} | {cc.get('writes', 0)} | {cc.get('routes_checked', 0)} | "
        f"{cc.get('generations_checked', 0)} | {cc.get('injections', 0)} | {cc.get('ops_checked', 0)} | "
        f"{len(cc['violations'])} | {len(cc['errors'])} |",
    ]
    for v in (cc["violations"] + cc["errors"])[:20]:
        lines.append(f"- {v}")
    cr = report["crash"]
    lines += ["", "## Crashes: SIGKILL at random moments, then reload", ""]
    if "error" in cr:
        lines.append(f"Not run: {cr['error']}")
    else:
        lines += [
            "| trials | kills | kills during compaction | acknowledged writes | recovered | edits lost "
            "| partial writes |",
            "|---|---|---|---|---|---|---|",
            f"| {cr['trials']} | {cr['kills']} | {cr.get('kills_during_compaction', 0)} "
            f"| {cr['acknowledged']} | {cr['recovered']} | **{cr['lost']}** | **{cr['partial']}** |",
        ]
        for p in cr.get("problems", [])[:20]:
            lines.append(f"- {p}")
    lines += [
        "",
        f"Verdict: **{'PASS' if report['passed'] else 'FAIL'}**. Seconds per part: "
        + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="6 crash trials, 16 flips, 1 concurrency seed")
    p.add_argument("--trials", type=int, default=None, help="crash trials (default 24; 6 with --quick)")
    p.add_argument("--flips", type=int, default=None, help="random bit flips in saved directories (48; 16)")
    p.add_argument("--random", type=int, default=None, help="random/damaged image byte strings (400; 100)")
    p.add_argument("--concurrency-seeds", type=int, default=None, help="concurrency runs (3; 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-crash", action="store_true", help="leave out the crash trials")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    for name, full, quick in (
        ("trials", 24, 6),
        ("flips", 48, 16),
        ("random", 400, 100),
        ("concurrency_seeds", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="esg-reliability-") as d:
        work = Path(d)
        fuzz, t_fuzz = run_fuzz(args, work)
        conc, t_conc = run_concurrency(args)
        if args.skip_crash:
            crash, t_crash = {"error": "skipped (--skip-crash)"}, 0.0
        else:
            crash, t_crash = run_crashes(args, work)
    passed = (
        all(not s["failed"] for s in fuzz.values())
        and not conc["violations"]
        and not conc["errors"]
        and ("error" in crash or (crash["lost"] == 0 and crash["partial"] == 0))
    )
    report = {
        "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "fuzz": fuzz,
        "concurrency": conc,
        "crash": crash,
        "seconds": {"fuzz": t_fuzz, "concurrency": t_conc, "crash": t_crash},
        "passed": passed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "reliability_quick" if args.quick else "reliability"
    md = render(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
