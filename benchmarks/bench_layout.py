"""Did the layout change (issue #14) slow the out-of-scope path? Old and new code, interleaved in one run.

    python benchmarks/bench_layout.py --old-rev a958fdb            # the commit before the change
    python benchmarks/bench_layout.py --old-dir ../old --quick

Two worker processes — one importing the old checkout (a git worktree of ``--old-rev``, or ``--old-dir``),
one this one — build the same memory (seeded synthetic edits, the tiny random LLaVA and the tiny CLIP),
then the parent asks them in turn for blocks of timed pairs: a bare ``model.generate`` and, right after it,
the wrapped ``EditedModel.generate`` on an input no edit's scope holds. Both routings a user has are timed:
``route_keys=`` (keys from an earlier route: routing alone) and ``images=`` + ``prompts=`` (key encoding
too, the encoder cache warm: the hot path a repeated picture takes). Blocks alternate old/new so machine load
hits both alike; each row reports the median wrapped/bare ratio of each version with a 95% bootstrap
interval, and new/old of the wrapped call's median time. Prints a markdown table, writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_layout.json"

WORKER = r"""
import io, json, sys, time
import numpy as np
import torch
from PIL import Image, ImageDraw
torch.set_num_threads(1)
from esg_memory import EditMemory, EditedModel
from esg_memory.loading import load_base_model, load_encoder

args = json.loads(sys.argv[1])
rng = np.random.default_rng(args["seed"])
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta"]

def picture(i):
    im = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(im)
    x, y = int(rng.integers(4, 30)), int(rng.integers(4, 30))
    d.ellipse([x, y, x + 28, y + 28], fill=COLORS[i % len(COLORS)])
    buf = io.BytesIO(); im.save(buf, format="PNG")
    return buf.getvalue()

model, processor = load_base_model("tiny-random-llava")
enc = load_encoder("esg-tiny-clip")
mem = EditMemory(enc)
specs = [{"image": picture(i), "question": f"what is item {i} in the picture?", "answer": f"thing {i}"}
         for i in range(args["edits"])]
for j in range(0, len(specs), 64):
    mem.add_many(specs[j:j + 64])
mem.settle()
em = EditedModel.wrap(model, processor, memory=mem)
b = args["batch"]
probe_imgs = [Image.new("RGB", (64, 64), (17 * k % 255, 90, 200)) for k in range(b)]
probe_txt = [f"how many wheels does vehicle {k} have?" for k in range(b)]
inputs = em.build_inputs(probe_imgs, probe_txt)
keys = mem.route(images=probe_imgs, texts=probe_txt).keys
assert not (mem.route_ids(keys=keys) >= 0).any(), "probe inputs must be out of scope"
gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
def bare(): model.generate(**inputs, **gen)
def by_keys(): em.generate(**inputs, route_keys=keys, **gen)
def by_images(): em.generate(images=probe_imgs, prompts=probe_txt, **gen)
for f in (bare, by_keys, by_images, bare):
    f()
import esg_memory
print("ready", esg_memory.__file__, flush=True)
for line in sys.stdin:
    n = int(line)
    out = {"keys": [], "images": [], "bare": []}
    for _ in range(n):
        for name, f in (("keys", by_keys), ("images", by_images)):
            t0 = time.perf_counter(); bare(); t1 = time.perf_counter(); f(); t2 = time.perf_counter()
            out["bare"].append(t1 - t0)
            out[name].append(((t2 - t1) / (t1 - t0), t2 - t1))
    print(json.dumps(out), flush=True)
"""


def _worker(checkout: Path, cfg: dict[str, Any]) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    p = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    line = p.stdout.readline().split()  # type: ignore[union-attr]
    if line[:1] != ["ready"] or not line[1].startswith(str(checkout)):
        raise RuntimeError(f"worker on {checkout} failed to start or imported another checkout: {line}")
    return p


def _ask(p: subprocess.Popen, n: int) -> dict[str, list]:
    p.stdin.write(f"{n}\n")  # type: ignore[union-attr]
    p.stdin.flush()  # type: ignore[union-attr]
    return json.loads(p.stdout.readline())  # type: ignore[union-attr]


def _ci(xs: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> tuple[float, float, float]:
    meds = np.median(rng.choice(xs, size=(n_boot, xs.size)), axis=1)
    return float(np.median(xs)), float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def run_row(
    old: Path, new: Path, edits: int, batch: int, rounds: int, block: int, seed: int
) -> dict[str, Any]:
    cfg = {"edits": edits, "batch": batch, "seed": seed}
    workers = {"old": _worker(old, cfg), "new": _worker(new, cfg)}
    got: dict[str, dict[str, list]] = {v: {"keys": [], "images": []} for v in workers}
    try:
        for r in range(rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for v in order:
                res = _ask(workers[v], block)
                for k in ("keys", "images"):
                    got[v][k] += res[k]
    finally:
        for p in workers.values():
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(60)
    rng = np.random.default_rng(seed)
    row: dict[str, Any] = {"edits": edits, "batch": batch, "pairs": rounds * block}
    for k in ("keys", "images"):
        for v in ("old", "new"):
            ratios = np.asarray([x[0] for x in got[v][k]])
            row[f"{k}_{v}"] = _ci(ratios, rng)
            row[f"{k}_{v}_ms"] = float(np.median([x[1] for x in got[v][k]]) * 1e3)
        row[f"{k}_new_over_old"] = row[f"{k}_new_ms"] / row[f"{k}_old_ms"]
    return row


def markdown(result: dict[str, Any]) -> str:
    def ci(t: list[float]) -> str:
        return f"{t[0]:.3f} ({t[1]:.3f}–{t[2]:.3f})"

    lines = [
        f"Old code: `{result['old']}`; new: `{result['new']}`. Tiny random LLaVA, tiny CLIP, one torch "
        "thread, 8 new tokens, out-of-scope inputs; old and new blocks interleaved. Ratios: wrapped / bare "
        "generate (median of pairs, 95% bootstrap interval).",
        "",
        "| edits | batch | route_keys: old | route_keys: new | new / old | images+prompts: old | "
        "images+prompts: new | new / old |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['edits']} | {r['batch']} | {ci(r['keys_old'])} | {ci(r['keys_new'])} | "
            f"{r['keys_new'][0] / r['keys_old'][0]:.3f} | {ci(r['images_old'])} | {ci(r['images_new'])} | "
            f"{r['images_new'][0] / r['images_old'][0]:.3f} |"
        )
    lines += [
        "",
        "new / old: the new code's median ratio over the old one's (below 1: less overhead). The wrapped "
        "call's absolute times are in the JSON (`*_ms`; each version runs in its own process).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-rev", default="a958fdb", help="git revision of the old code (a temporary worktree)")
    p.add_argument("--old-dir", type=Path, help="a checkout of the old code (instead of --old-rev)")
    p.add_argument("--edits", type=int, nargs="+", default=[8, 1000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=20, help="pairs per block")
    p.add_argument("--quick", action="store_true", help="8 and 200 edits, fewer pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--render", action="store_true", help="only re-render the markdown of --out's JSON")
    args = p.parse_args(argv)
    if args.render:
        md = markdown(json.loads(args.out.read_text()))
        args.out.with_suffix(".md").write_text(md)
        print(md)
        return 0
    if args.quick:
        args.edits, args.rounds, args.block = [8, 200], 4, 10
    tmp = None
    old = args.old_dir
    if old is None:
        tmp = tempfile.mkdtemp(prefix="esg-old-")
        old = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old_rev],
            check=True,
            capture_output=True,
        )
    try:
        t0 = time.time()
        rows = []
        for e in args.edits:
            for b in args.batches:
                rows.append(run_row(old.resolve(), ROOT, e, b, args.rounds, args.block, args.seed))
                print(
                    f"edits {e} batch {b}: keys new/old {rows[-1]['keys_new_over_old']:.3f}, "
                    f"images new/old {rows[-1]['images_new_over_old']:.3f}",
                    file=sys.stderr,
                )
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        result = {
            "old": args.old_rev if args.old_dir is None else str(args.old_dir),
            "new": f"{head} (+ worktree)",
            "rows": rows,
            "seconds": round(time.time() - t0, 1),
        }
    finally:
        if tmp is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
