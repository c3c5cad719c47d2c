"""A tiny real eval run (``esg-memory eval --out``) for the Audit view's tests: the shipped easy-vqa LLaVA and
CLIP, 6 edits with revisions and deletions forced in, adapters tuned briefly (20 steps) so the labels differ
between methods (ours mostly correct, always_nearest over), four methods. A few seconds."""

from __future__ import annotations

from pathlib import Path

METHODS = ("bare", "ours", "text_only", "always_nearest")


def tiny_eval_run(out: Path) -> Path:
    """Run the eval into ``out`` and return it (results.json, audit.jsonl, probe_images/, ...)."""
    import easy_vqa  # noqa: F401  (an [all] extra: missing means failing, never skipping)

    from esg_memory.eval import EvalConfig, run_eval
    from esg_memory.loading import load_base_model, load_encoder

    cfg = EvalConfig(kind="easyvqa", edits=6, seed=1, revise_rate=0.4, delete_rate=0.5, tune="sync",
                     tune_max_steps=20, methods=METHODS)
    run_eval(cfg, out, progress=False, model=load_base_model("tiny-llava"),
             encoder=load_encoder("esg-easyvqa-clip"))
    return out
