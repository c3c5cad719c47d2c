"""What an edit's adapter tuning costs on the scenes world, and what cheaper budgets give up (issue #16:
the 10,000-edit stream must fit in 2 h on 2 cores, and tuning is 80 % of an eval edit).

Two parts, both in this run:

1. **Step cost against rows.** One tuning step (forward with a K/V prefix, gradient with respect to the
   prefix alone) of the shipped scenes LLaVA at 8, 16, 32 and 64 rows, torch's own thread count. If
   the step were overhead-bound, tuning several edits in one batch would be nearly free; the ratio
   column says whether it is (ratio to the 16-row step, the library's default examples per edit).
2. **Budgets on a validation stream.** ``esg-memory eval --kind scenes`` on a short stream of another
   seed than any reported result (``--seed``, default 11), once per budget (learning rate, most steps,
   most examples, patience); the first budget is the baseline every ratio is against. Columns:
   tuning seconds per edit (revisions included), the share of tunes that reached an exact match on
   every tuning example, **reliability** (the edit's own input: the tuning set, so the one figure a
   budget may be chosen on), and forced fidelity on the held-out T-Gen / I-Gen / IT-Gen probes
   (reported, not chosen on). The 10k column projects tuning alone for a 10,000-edit stream
   (seconds per edit x 10,000).

Writes ``tuning_budget.json`` and ``tuning_budget.md`` to ``--out``.

    python benchmarks/bench_tuning_budget.py                 # 30-edit stream, 5 budgets (~5 min)
    python benchmarks/bench_tuning_budget.py --quick         # 6 edits, 2 budgets (< 1 min)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_report

logger = logging.getLogger("bench_tuning_budget")

#: (learning rate, most steps, most examples, patience); the first is the baseline (the committed 1k run's)
BUDGETS: tuple[tuple[float, int, int, int | None], ...] = (
    (0.8, 60, 16, None),
    (0.8, 60, 8, None),
    (0.8, 30, 16, None),
    (0.8, 60, 8, 20),
    (0.8, 60, 8, 10),
)
ROWS = (8, 16, 32, 64)


def step_cost(rows: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Median milliseconds of one tuning step at each row count (synthetic embeddings of the shipped
    scenes LLaVA's width; prefix of 12 positions, 48 input positions: a typical scenes example)."""
    import torch

    from esg_memory.loading import load_base_model
    from esg_memory.model.families import make_cache

    model, _ = load_base_model("esg-scenes-llava")
    cfg = model.config.text_config
    heads, dim = cfg.num_key_value_heads, cfg.head_dim
    p_len, length = 12, 48
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in rows:
        embeds = torch.randn(n, length, cfg.hidden_size, generator=gen)
        kv = [(torch.randn(1, heads, p_len, dim, generator=gen).requires_grad_(),
               torch.randn(1, heads, p_len, dim, generator=gen).requires_grad_())
              for _ in range(cfg.num_hidden_layers)]
        mask = torch.ones(n, p_len + length, dtype=torch.long)
        pos = torch.arange(p_len, p_len + length).expand(n, -1)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            cache = make_cache(model, [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache,
                           logits_to_keep=3).logits
            torch.autograd.grad(logits.float().logsumexp(-1).mean(), [t_ for pair in kv for t_ in pair])
            times.append(time.perf_counter() - t)
        out.append({"rows": n, "ms": 1000 * sorted(times)[len(times) // 2]})
    base = next((r["ms"] for r in out if r["rows"] == 16), out[0]["ms"])
    for r in out:
        r["ratio_to_16"] = r["ms"] / base
        r["ms_per_row"] = r["ms"] / r["rows"]
    return out


def budget_row(edits: int, seed: int, budget: tuple[float, int, int, int | None]) -> dict[str, Any]:
    """One validation-stream eval under ``budget``; its tuning cost and what it kept."""
    from esg_memory.eval import EvalConfig, run_eval

    lr, steps, examples, patience = budget
    cfg = EvalConfig(kind="scenes", edits=edits, seed=seed, protocol="retention", methods=("ours",),
                     tune_lr=lr, tune_max_steps=steps, tune_examples=examples, tune_patience=patience)
    res = run_eval(cfg, progress=False)
    tune, tuning = res["timings"]["stages"]["tune"], res["timings"]["tuning"]
    ret = res["methods"]["ours"]["retention"]
    fid = ret["fidelity"]
    return {
        "lr": lr, "max_steps": steps, "max_examples": examples, "patience": patience,
        "tunes": tune["calls"], "tune_s_per_edit": tune["per_edit_s"],
        "exact_share": tuning["exact_share"], "mean_steps": tuning["mean_steps"],
        "reliability": ret["reliability"],
        "forced_t_gen": fid["t_gen"], "forced_i_gen": fid["i_gen"], "forced_i_t_gen": fid["i_t_gen"],
        "projected_10k_tune_h": tune["per_edit_s"] * 10_000 / 3600,
    }


def _table(steps: list[dict], rows: list[dict], edits: int, seed: int) -> str:
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch threads as default."
    lines = ["# Tuning budget (scenes world)", "", host, "",
             "## One tuning step against rows", "", "| rows | ms | ratio to 16 rows | ms per row |",
             "|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['ms']:.1f} | {r['ratio_to_16']:.2f}x | {r['ms_per_row']:.2f} |"
              for r in steps]
    lines += ["", f"## Budgets on a validation stream ({edits} edits, seed {seed}; first row = baseline)", "",
              "| lr | steps | examples | patience | tune s/edit | ratio | exact | mean steps | reliability "
              "| forced T-Gen | forced I-Gen | forced IT-Gen | 10k tuning h |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = rows[0]["tune_s_per_edit"] if rows else 1.0
    for r in rows:
        lines.append(
            f"| {r['lr']} | {r['max_steps']} | {r['max_examples']} | {r['patience'] or '-'} "
            f"| {r['tune_s_per_edit']:.3f} | {r['tune_s_per_edit'] / base:.2f}x | {r['exact_share']:.2f} "
            f"| {r['mean_steps']:.1f} | {r['reliability']:.3f} | {r['forced_t_gen']:.3f} "
            f"| {r['forced_i_gen']:.3f} | {r['forced_i_t_gen']:.3f} | {r['projected_10k_tune_h']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=None, help="validation stream length (default 30; quick 6)")
    ap.add_argument("--seed", type=int, default=11, help="validation stream seed (not a reported one)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats of each step size")
    ap.add_argument("--quick", action="store_true", help="6 edits, the first two budgets, 3 repeats, 3 sizes")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark process, not the library: no hub calls
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    edits, budgets, repeats, sizes = args.edits or 30, BUDGETS, args.repeats, ROWS
    if args.quick:
        edits, budgets, repeats, sizes = args.edits or 6, BUDGETS[:2], 3, ROWS[:3]
    steps = step_cost(sizes, repeats)
    rows = []
    for b in budgets:
        rows.append(budget_row(edits, args.seed, b))
        logger.warning("budget %s: %.3f s/edit", b, rows[-1]["tune_s_per_edit"])
    report = {"format": "esg-memory-bench-tuning-budget", "format_version": 1, "edits": edits,
              "seed": args.seed, "step_cost": steps, "budgets": rows, "cpus": os.cpu_count()}
    stem = "tuning_budget_quick" if args.quick else "tuning_budget"
    write_report(args.out, stem, report, _table(steps, rows, edits, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
