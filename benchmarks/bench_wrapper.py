"""What does wrapping a frozen MLLM with an edit memory cost, and how reliable are the adapters?

    python benchmarks/bench_wrapper.py --quick     # CI size: 0 and 100 edits, tiny LLaVA + Qwen2-VL
    python benchmarks/bench_wrapper.py             # 0, 100 and 10k edits in memory

Everything is measured in one run on the same inputs, on the tiny offline models (random weights):

* generate overhead: bare ``model.generate`` vs ``EditedModel.generate`` with 0 / 100 / 10k edits in
  memory, inputs out of scope and in scope, batch 1 and 8; the ratio with key encoding (routing from
  images + prompts, the encoder cache cleared before every such call so each one encodes) and
  without (``route_keys=`` reused). All calls generate exactly ``--new-tokens`` tokens
  (``min_new_tokens``) so bare and wrapped do the same decoding work. ``--reps`` interleaved
  repetitions (bare, keys, encode, bare, ...); min and median are kept, ratios use the same
  statistic of both sides. The routing calls are also timed alone: ``route_ids`` (what a wrapped
  call runs) and the full ``route`` (what ``retrieve`` runs).
* edit lifecycle: add (memory + compiled adapter; the encoder's default cache, and cleared before
  each add = cold), compile alone, tune to exact match, delete; add and delete again at the largest
  memory size (a dense memory: every deleted edit has holders whose scopes are re-fitted).
* reliability: fraction of edit inputs (and paraphrases / augmented images) answered with the target,
  with the compiled adapter vs the tuned one, and fraction of unrelated inputs left bit-identical.
  Honest caveat: random tiny models cannot follow instructions, so a compiled statement rarely
  changes their answer; it is the tuned adapter that makes an edit exact.
* bytes per edit for each adapter kind, measured on the tiny models and computed for the
  LLaVA-1.5-7B and Qwen2-VL-7B shapes (from their configs) at the measured statement length.

Synthetic shape images are used (no dataset needed); ``--data`` is accepted for symmetry with the
other benchmarks and unused. Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a script, not the library: never wait on a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_wrapper.json"
KINDS = ("circle", "rect", "tri")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown", "white", "purple", "orange")


def shape(rng: np.random.Generator, size: int = 64) -> Image.Image:
    bg = tuple(int(x) for x in rng.integers(190, 256, 3))
    fg = tuple(int(x) for x in rng.integers(0, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    x0, y0 = (int(v) for v in rng.integers(4, size // 3, 2))
    x1, y1 = (int(v) for v in rng.integers(2 * size // 3, size - 4, 2))
    kind = KINDS[int(rng.integers(3))]
    if kind == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fg)
    elif kind == "rect":
        d.rectangle([x0, y0, x1, y1], fill=fg)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fg)
    return im


def edit_spec(i: int, rng: np.random.Generator) -> dict[str, Any]:
    return {"image": shape(rng), "question": f"what color is shape {i}?", "answer": COLORS[i % len(COLORS)]}


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _quantile(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, round(q * (len(sorted_xs) - 1)))]


def _median_ci(xs: list[float], rng: np.random.Generator, n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap confidence interval of the median."""
    a = np.asarray(xs)
    meds = np.median(a[rng.integers(0, a.size, size=(n_boot, a.size))], axis=1)
    return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def med_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def bench_family(model_type: str, args: argparse.Namespace, flush=lambda res: None) -> dict[str, Any]:
    from esg_memory.augment import augment_image, question_templates
    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.memory import EditMemory
    from esg_memory.model import EditedModel, adapter_bytes, get_family, reference_configs
    from esg_memory.tiny import build_tiny

    rng = np.random.default_rng(args.seed)
    model, proc = build_tiny(model_type, seed=args.seed)
    fam = get_family(model)
    enc = ClipKeyEncoder("esg-tiny-clip")  # its default cache; cleared where a cold call is measured
    mem = EditMemory(enc)
    em = EditedModel.wrap(model, proc, mem)
    res: dict[str, Any] = {"model_type": model_type, "params": int(model.num_parameters())}

    # ---- lifecycle and reliability ---------------------------------------------------------------
    n_rel = args.reliability_edits
    specs = [edit_spec(100_000 + i, rng) for i in range(n_rel)]
    add_t, cold_t, compile_t, tune_t, tune_steps, exact = [], [], [], [], [], []
    for j, s in enumerate(tqdm(specs, desc=f"{model_type}: add", leave=False)):
        cold = j % 2 == 1  # alternate warm (default cache) and cold adds so both see the same load
        if cold:
            enc.clear_cache()
        t0 = time.perf_counter()
        eid = em.add_edit(s["image"], s["question"], s["answer"], tune="never")
        (cold_t if cold else add_t).append(time.perf_counter() - t0)
        s["id"] = eid
        t0 = time.perf_counter()
        a = em.runtime.compile(eid, 1, s["question"], s["answer"])
        em.runtime.forget(eid)
        em.runtime.kv(a)
        compile_t.append(time.perf_counter() - t0)

    def probes(s: dict[str, Any]) -> list[tuple[Any, str]]:
        rows = [(s["image"], s["question"])]
        rows += [(s["image"], q) for q in question_templates(s["question"], 2)]
        rows += [(im, s["question"]) for im in augment_image(s["image"], 1, seed=7)]
        return rows

    def accuracy() -> tuple[float, float, float]:
        """(target answered / probes, routed to the edit / probes, target answered / routed probes)."""
        hit = routed = hit_routed = total = 0
        for s in specs:
            rows = probes(s)
            ims, qs = [r[0] for r in rows], [r[1] for r in rows]
            ok_route = [r.edit_id == s["id"] for r in em.retrieve(images=ims, prompts=qs)]
            ok = [a == s["answer"] for a in em.answer(images=ims, prompts=qs, max_new_tokens=6)]
            routed += sum(ok_route)
            hit += sum(ok)
            hit_routed += sum(a and r for a, r in zip(ok, ok_route, strict=True))
            total += len(rows)
        return hit / total, routed / total, hit_routed / max(routed, 1)

    acc_compiled, routed_frac, _ = accuracy()
    for s in tqdm(specs, desc=f"{model_type}: tune", leave=False):
        rep = em.tune_edit(s["id"])
        tune_t.append(rep.seconds)
        tune_steps.append(rep.steps)
        exact.append(rep.exact)
    acc_tuned, _, acc_tuned_routed = accuracy()

    unrelated = [
        (shape(rng), q) for q in ("is there a circle?", "how many objects are there?", "describe this")
    ]
    u_ims, u_qs = [u[0] for u in unrelated], [u[1] for u in unrelated]
    oos = [r.edit_id == -1 for r in em.retrieve(images=u_ims, prompts=u_qs)]
    with torch.no_grad():
        bare_u = model.generate(**fam.build_inputs(proc, u_ims, u_qs), max_new_tokens=6, do_sample=False)
        wrap_u = em.generate(images=u_ims, prompts=u_qs, max_new_tokens=6, do_sample=False)
    locality = float(torch.equal(bare_u, wrap_u)) if all(oos) else float("nan")

    sizes = {k: [] for k in ("compiled", "soft", "kv")}
    lengths = []
    for s in specs[: min(4, n_rel)]:
        base = em.runtime.compile(s["id"], 1, s["question"], s["answer"])
        lengths.append(base.length)
        sizes["compiled"].append(base.stored_bytes())
        ex = [(s["image"], s["question"])]
        for kind in ("soft", "kv"):
            tuned, _ = em.runtime.tune(base, ex, s["answer"], kind=kind)
            sizes[kind].append(tuned.stored_bytes())
    del_t = []
    for s in specs:
        t0 = time.perf_counter()
        em.delete_edit(s["id"])
        del_t.append(time.perf_counter() - t0)
    res["lifecycle"] = {
        "add_compiled_ms": med_ms(add_t),
        "add_compiled_cold_cache_ms": med_ms(cold_t),
        "compile_only_ms": med_ms(compile_t),
        "tune_s": statistics.median(tune_t),
        "tune_steps": statistics.median(tune_steps),
        "tune_exact_frac": sum(exact) / len(exact),
        "delete_ms": med_ms(del_t),
        "n": n_rel,
    }
    res["reliability"] = {
        "compiled": acc_compiled,
        "tuned_given_routed": acc_tuned_routed,
        "tuned": acc_tuned,
        "routed": routed_frac,
        "unrelated_bit_identical": locality,
        "probes_per_edit": len(probes(specs[0])),
    }
    p_len = round(statistics.mean(lengths))
    ref = {
        "llava": "llava-1.5-7b",
        "llava_next": "llava-1.5-7b",
        "qwen2_vl": "qwen2-vl-7b",
        "qwen2_5_vl": "qwen2-vl-7b",
    }[model_type]
    spec7 = fam.spec(reference_configs()[ref])
    from esg_memory.model import soft_rank_for

    r7 = soft_rank_for(spec7, p_len, em.runtime.config)
    res["bytes"] = {
        "tiny_measured": {k: statistics.median(v) for k, v in sizes.items()},
        "statement_tokens": p_len,
        "reference": ref,
        "reference_soft_rank": r7,
        "reference_computed": {
            "compiled": adapter_bytes(spec7, p_len, "compiled"),
            "soft": adapter_bytes(spec7, p_len, "soft", rank=r7),
            "kv_fp16": adapter_bytes(spec7, p_len, "kv"),
            "hot_kv_cache_fp16": p_len * spec7.kv_bytes_per_token(2),
        },
    }

    # ---- generate overhead -----------------------------------------------------------------------
    probes_in = [edit_spec(200_000 + i, rng) for i in range(8)]
    for s in probes_in:
        s["id"] = em.add_edit(s["image"], s["question"], s["answer"], tune="never")
    outside = [(shape(rng), f"is shape {i} bigger than the others?") for i in range(8)]
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    overhead: list[dict[str, Any]] = []
    res["overhead"] = overhead
    res["fill_seconds"] = {}
    have = 0
    for n_edits in args.edits:
        if n_edits > have:
            batch = [edit_spec(i, rng) for i in range(have, n_edits)]
            t_fill = time.perf_counter()
            for j in tqdm(range(0, len(batch), 500), desc=f"{model_type}: fill {n_edits}", leave=False):
                mem.add_many(batch[j : j + 500])
            res["fill_seconds"][str(n_edits)] = round(time.perf_counter() - t_fill, 1)
            have = n_edits
        for bsz in (1, 8):
            for scope, rows in (("out", outside), ("in", [(s["image"], s["question"]) for s in probes_in])):
                ims, qs = [r[0] for r in rows[:bsz]], [r[1] for r in rows[:bsz]]
                inputs = em.build_inputs(ims, qs)
                keys = mem.route(images=ims, texts=qs).keys
                expect = -1 if scope == "out" else None
                ids = mem.route(keys=keys).edit_ids
                assert (ids == -1).all() if expect == -1 else (ids >= 0).all(), (scope, ids)
                # Every call but the first right after a generate, as in a serving loop: a generate
                # evicts the caches routing uses, which costs it about as much as the routing
                # itself. The wrapped generate follows the bare one directly, so its own routing
                # runs as cold as in a loop of wrapped calls (not warmed by a routing call).
                gen_bare = lambda inputs=inputs: model.generate(**inputs, **gen)  # noqa: E731
                live_index = mem.snapshot(settle=False).index  # a snapshot shares the live index
                calls = {
                    "bare": gen_bare,
                    "keys": lambda inputs=inputs, keys=keys: em.generate(**inputs, route_keys=keys, **gen),
                    "route_ids": lambda keys=keys: mem.route_ids(keys=keys),
                    "encode": lambda inputs=inputs, ims=ims, qs=qs: em.generate(
                        **inputs, route_images=ims, route_texts=qs, **gen
                    ),
                    "route_encode": lambda ims=ims, qs=qs: mem.route_ids(images=ims, texts=qs),
                    "bare_2": gen_bare,
                    "route": lambda keys=keys: mem.route(keys=keys),
                    "bare_3": gen_bare,
                    # the baseline of the rule-out `route_ids` starts with: every key's margin
                    "scan": lambda keys=keys, ix=live_index: ix.scan_margins(keys),
                }
                with torch.no_grad():
                    for f in calls.values():
                        f()  # warm-up (adapter K/V cached, allocator warm)
                    times: dict[str, list[float]] = {k: [] for k in calls}
                    for _ in range(args.reps):
                        for k, f in calls.items():
                            if k in ("encode", "route_encode"):
                                enc.clear_cache()  # outside the timed call: each one encodes
                            times[k] += timed(f, 1)
                    route_keys, route_enc = times["route_ids"], times["route_encode"]
                row: dict[str, Any] = {"edits": n_edits + len(probes_in), "batch": bsz, "scope": scope}
                for stat, fn in (("median", med_ms), ("min", lambda xs: 1000 * min(xs))):
                    b = fn(times["bare"])
                    row[stat] = {
                        "bare_ms": b,
                        "wrapped_no_encoding_ms": fn(times["keys"]),
                        "wrapped_with_encoding_ms": fn(times["encode"]),
                        "ratio_no_encoding": fn(times["keys"]) / b,
                        "ratio_with_encoding": fn(times["encode"]) / b,
                    }
                # routing alone is what an out-of-scope call adds to the bare generate; timed in
                # isolation it is far less noisy than the difference of two generate timings
                row["route_keys_ms"] = med_ms(route_keys)
                row["route_keys_min_ms"] = 1000 * min(route_keys)
                row["route_full_ms"] = med_ms(times["route"])
                row["route_encode_ms"] = med_ms(route_enc)
                row["scan_ms"] = med_ms(times["scan"])
                # each repetition's wrapped call right after its own bare one: the ratio of the pair
                # cancels the machine's drift, so its median is the steadiest estimate of the overhead
                pairs = sorted(w / b for b, w in zip(times["bare"], times["keys"], strict=True))
                lo, hi = _median_ci(pairs, np.random.default_rng(args.seed))
                row["paired_ratio"] = {"median": statistics.median(pairs), "q25": _quantile(pairs, 0.25),
                                       "q75": _quantile(pairs, 0.75), "ci95": [lo, hi], "n": len(pairs)}
                row["route_ratio_no_encoding"] = 1 + row["route_keys_ms"] / row["median"]["bare_ms"]
                overhead.append(row)
        flush(res)  # a long run (10k edits) leaves usable partial results behind
    res["lifecycle_at_size"] = lifecycle_at_size(em, mem, rng, args, have)
    return res


def lifecycle_at_size(em: Any, mem: Any, rng: np.random.Generator, args: argparse.Namespace, have: int
                      ) -> dict[str, Any]:
    """Add and delete in the filled memory (the overhead loop's largest size): cost grows with density."""
    from esg_memory.memory import EditMemory

    assert isinstance(mem, EditMemory)
    size = len(mem)
    specs = [edit_spec(300_000 + i, rng) for i in range(args.reliability_edits)]
    add_t, ids = [], []
    for s in specs:
        t0 = time.perf_counter()
        ids.append(em.add_edit(s["image"], s["question"], s["answer"], tune="never"))
        add_t.append(time.perf_counter() - t0)
    filler = sorted(e.id for e in mem.list() if e.id < have)  # the fill's edits: ids 0..have-1
    victims = [int(v) for v in rng.choice(filler, size=min(len(filler), len(ids)), replace=False)]
    del_t, settle_t, holders = [], [], []
    for v in [*ids, *victims]:
        holders.append(len(mem.holders(v)))
        t0 = time.perf_counter()
        em.delete_edit(v)
        del_t.append(time.perf_counter() - t0)
        # the holders' re-fit runs after the call on the settler thread; waiting for it keeps it
        # out of the next call's time (a delete issued during a settle waits for it: its own cost)
        while mem.pending_refits:
            time.sleep(0.0005)
        settle_t.append(time.perf_counter() - t0)
    return {
        "edits": size,
        "add_compiled_ms": med_ms(add_t),
        "delete_ms": med_ms(del_t),
        "delete_min_ms": 1000 * min(del_t) if del_t else float("nan"),
        "delete_settled_ms": med_ms(settle_t),
        "holders_median": statistics.median(holders) if holders else 0,
        "n": len(del_t),
    }


def _paired(o: dict[str, Any]) -> str:
    p = o.get("paired_ratio")
    if p is None:
        return "-"
    ci = p.get("ci95")
    return f"{p['median']:.3f} [{p['q25']:.3f}, {p['q75']:.3f}]" + (
        f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## Generate overhead (ms; ratio = wrapped / bare on the same inputs in the same run)",
        "",
        "Interleaved repetitions (bare, wrapped, ... in turn) on a shared machine: min (noise only adds",
        "time) and, for keys reused, the median ratio too, and the median of each repetition's",
        "wrapped/bare pair (interquartile range in brackets, 95% bootstrap interval of the median in",
        "parentheses). route_ids = the routing a wrapped call runs",
        "(median, timed alone right after a generate): what an out-of-scope call adds to the bare",
        "generate; route = the full RouteResult (explanations, runner-up) that `retrieve` computes;",
        "scan = every key's margin (`scan_margins`), the linear baseline of the rule-out `route_ids`",
        "starts with (`maybe_in_scope`), timed the same way.",
        "",
        "| model | edits | batch | scope | bare | wrapped, keys reused | ratio (min) | ratio (median) "
        "| paired ratio, median [IQR] (95% CI) "
        "| wrapped, encoding | ratio | route_ids | scan | route | route_ids, encoding | 1 + route_ids/bare |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fam in result["families"]:
        for o in fam["overhead"]:
            m, md = o["min"], o["median"]
            lines.append(
                f"| {fam['model_type']} | {o['edits']} | {o['batch']} | {o['scope']} | {m['bare_ms']:.1f} | "
                f"{m['wrapped_no_encoding_ms']:.1f} | {m['ratio_no_encoding']:.3f} | "
                f"{md['ratio_no_encoding']:.3f} | {_paired(o)} | "
                f"{m['wrapped_with_encoding_ms']:.1f} | {m['ratio_with_encoding']:.3f} | "
                f"{o['route_keys_ms']:.2f} | {o.get('scan_ms', float('nan')):.2f} | "
                f"{o.get('route_full_ms', float('nan')):.2f} | "
                f"{o['route_encode_ms']:.2f} | {o['route_ratio_no_encoding']:.3f} |"
            )
    lines += [
        "",
        "## Edit lifecycle and reliability (tiny random models)",
        "",
        "| model | add (compiled) ms | add, cold cache ms | compile only ms | tune s (steps) | exact | "
        "delete ms | compiled acc | tuned acc | routed | tuned acc when routed | unrelated identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fam in result["families"]:
        lc, rl = fam["lifecycle"], fam["reliability"]
        lines.append(
            f"| {fam['model_type']} | {lc['add_compiled_ms']:.1f} | "
            f"{lc.get('add_compiled_cold_cache_ms', float('nan')):.1f} | {lc['compile_only_ms']:.2f} | "
            f"{lc['tune_s']:.2f} ({lc['tune_steps']:.0f}) | {lc['tune_exact_frac']:.2f} | "
            f"{lc['delete_ms']:.1f} | {rl['compiled']:.2f} | {rl['tuned']:.2f} | {rl['routed']:.2f} | "
            f"{rl.get('tuned_given_routed', float('nan')):.2f} | "
            f"{rl['unrelated_bit_identical']} |"
        )
    lines += [
        "",
        "At the largest memory size (a dense one: the tiny encoder's keys are all alike, so every",
        "deleted edit has holders whose neighbour sets and scopes are recomputed). A delete call",
        "removes the edit from routing; the holders are re-fitted right after on the settler thread",
        "(until settled = the call plus that re-fit, waited for before the next delete):",
        "",
        "| model | edits | add (compiled) ms | delete ms (median) | delete ms (min) | until settled ms "
        "| holders per delete |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fam in result["families"]:
        z = fam.get("lifecycle_at_size")
        if z:
            lines.append(
                f"| {fam['model_type']} | {z['edits']} | {z['add_compiled_ms']:.1f} | {z['delete_ms']:.1f} | "
                f"{z['delete_min_ms']:.1f} | {z.get('delete_settled_ms', float('nan')):.1f} | "
                f"{z['holders_median']:.0f} |"
            )
    lines += [
        "",
        "Memory fill time (add_many, s): "
        + "; ".join(
            f"{fam['model_type']} "
            + ", ".join(f"{k} edits {v}" for k, v in fam.get("fill_seconds", {}).items())
            for fam in result["families"]
        ),
    ]
    lines += [
        "",
        "## Bytes per edit (stored adapter; 7B computed at the measured statement length)",
        "",
        "| model | P | tiny compiled | tiny soft | tiny kv | 7B shape | 7B compiled | 7B soft (rank) | "
        "7B kv fp16 | 7B hot K/V cache |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for fam in result["families"]:
        by, t, r = fam["bytes"], fam["bytes"]["tiny_measured"], fam["bytes"]["reference_computed"]
        lines.append(
            f"| {fam['model_type']} | {by['statement_tokens']} | {t['compiled']:.0f} | {t['soft']:.0f} | "
            f"{t['kv']:.0f} | {by['reference']} | {r['compiled']} | "
            f"{r['soft']} ({by['reference_soft_rank']}) | {r['kv_fp16']} | {r['hot_kv_cache_fp16']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI size: 0 and 100 edits, fewer repetitions")
    p.add_argument("--edits", type=int, nargs="+", help="memory sizes (overrides the presets)")
    p.add_argument("--families", nargs="+", default=["llava", "qwen2_vl"])
    p.add_argument("--reps", type=int, help="timing repetitions (median)")
    p.add_argument("--reliability-edits", type=int, help="edits used for lifecycle / reliability")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="unused (synthetic images)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = p.parse_args(argv)
    args.edits = args.edits or ([0, 100] if args.quick else [0, 100, 10_000])
    args.reps = args.reps or (5 if args.quick else 15)
    args.reliability_edits = args.reliability_edits or (4 if args.quick else 12)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.time()
    fams: list[dict[str, Any]] = []

    def write(partial: dict[str, Any] | None = None) -> dict[str, Any]:
        result = {
            "meta": {
                "argv": list(sys.argv[1:] if argv is None else argv),
                "torch": torch.__version__,
                "threads": args.threads,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "new_tokens": args.new_tokens,
                "reps": args.reps,
                "seconds": round(time.time() - t0, 1),
                "complete": partial is None,
            },
            "families": fams + ([partial] if partial is not None else []),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return result

    for mt in args.families:
        fams.append(bench_family(mt, args, flush=write))
    result = write()
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
