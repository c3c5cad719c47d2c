"""Adapter fidelity (issue #15, part A): P(new answer | the right edit injected), by probe kind, held out.

    python benchmarks/bench_fidelity.py                  # 16 edits, every variant below
    python benchmarks/bench_fidelity.py --edits 4 --variants unrelated4

Where vs what: this measures *what* an edit does once injected, with routing taken out of the question.
Each probe is generated with its edit's adapter forced in (``route_keys=`` the edit's own anchor key, so
the router picks that edit whatever the input is), and scored by exact match with the new answer.

Edits: one per easy-vqa subject (shape + colour), on a held-out **test** picture, a colour or shape
question, a new answer of the same kind (``bench_default._plan_edits``). The shipped easy-vqa LLaVA and
CLIP. Probe kinds:

- ``reliability``: the edit input itself;
- ``paraphrase``: the rewrites `question_templates` makes (the ones tuning uses, so not held out);
- ``held_out_phrasing``: questions written for this benchmark in other words ("which colour does the
  figure have?"), never seen by the shipped models' training, the tuning examples or calibration;
- ``other_picture``: the edit's question on other test pictures of the same subject;
- ``held_out_rendering``: the edit picture drawn differently (rotated, blurred, tinted background,
  resized) — transformations outside `augment_image`'s ranges — with the edit's question;
- ``other_picture_x_phrasing``: other pictures of the subject with held-out phrasings.

Variants differ only in the tuning examples (`EditedModelConfig`); the edits, probes and models are the
same. Reported per variant: fidelity per probe kind, mean tuning seconds per edit, exact-match rate of
tuning. Prints a markdown table, writes JSON + markdown (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_default import _plan_edits, load_split

log = logging.getLogger("bench_fidelity")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_fidelity.json"

#: Phrasings written for this benchmark only (no training, tuning or calibration set contains them).
HELD_OUT = {
    "color": [
        "which colour does the figure have?",
        "tell me the colour of the figure.",
        "the shape here is painted in which colour?",
        "name the hue of the object in this picture.",
    ],
    "shape": [
        "which geometric figure is drawn here?",
        "name the form of the object in this picture.",
        "what kind of figure do you see?",
        "the object here has which outline?",
    ],
}

#: Named tuning-example variants: EditedModelConfig fields. ``unrelated8`` is the library default;
#: ``before`` the default until it (no unrelated questions).
VARIANTS = {
    "before": {"n_paraphrases": 4, "n_augmented_images": 2, "n_unrelated_questions": 0},
    "unrelated4": {"n_paraphrases": 4, "n_augmented_images": 2, "n_unrelated_questions": 4},
    "unrelated8": {"n_paraphrases": 4, "n_augmented_images": 2, "n_unrelated_questions": 8},
    "unrelated8_noaug": {"n_paraphrases": 4, "n_augmented_images": 0, "n_unrelated_questions": 8},
    "unrelated6_aug4": {"n_paraphrases": 4, "n_augmented_images": 4, "n_unrelated_questions": 6},
    "unrelated8_aug4_20": {"n_paraphrases": 4, "n_augmented_images": 4, "n_unrelated_questions": 8,
                           "max_examples": 20},
    "unrelated8_para2_aug4": {"n_paraphrases": 2, "n_augmented_images": 4, "n_unrelated_questions": 8},
}


def renderings(img) -> list[Any]:
    """The edit picture drawn differently: outside augment_image's small crops / jitters."""
    from PIL import Image, ImageFilter, ImageOps

    w, h = img.size
    tinted = Image.blend(img, Image.new("RGB", img.size, (230, 220, 160)), 0.25)
    small = ImageOps.pad(img.resize((w // 2, h // 2)), (w, h), color=(255, 255, 255))
    return [
        img.rotate(30, fillcolor=(255, 255, 255)),
        img.filter(ImageFilter.GaussianBlur(1.5)),
        tinted,
        small,
    ]


def run_variant(name: str, fields: dict[str, int], plan: list[dict], images: dict, max_steps: int) -> dict:
    import torch

    from esg_memory.augment import question_templates
    from esg_memory.config import AdapterConfig, EditedModelConfig
    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.memory import EditMemory
    from esg_memory.model import EditedModel
    from esg_memory.pretrained import (
        EASYVQA_CLIP,
        easyvqa_locality_pool,
        easyvqa_memory_config,
        load_easyvqa_llava,
        pretrained_path,
    )

    model, proc = load_easyvqa_llava()
    enc = ClipKeyEncoder(f"local-dir:{pretrained_path(EASYVQA_CLIP)}")
    mem = EditMemory(enc, config=easyvqa_memory_config(), locality_pool=easyvqa_locality_pool())
    fields = dict(fields)
    adapters = AdapterConfig(max_steps=max_steps, max_examples=fields.pop("max_examples", 16))
    cfg = EditedModelConfig(adapters=adapters, **fields)
    em = EditedModel.wrap(model, proc, memory=mem, encoder=enc, config=cfg)
    hits: dict[str, list[bool]] = {}
    tune_s, exact, misrouted = [], [], 0
    for p in plan:
        img = images[p["image"]]
        kind = "color" if "color" in p["q"] else "shape"
        t0 = time.perf_counter()
        eid = em.add_edit(img, p["q"], p["new"], tune="sync")
        tune_s.append(time.perf_counter() - t0)
        rep = em.tune_reports.get(eid)
        exact.append(bool(rep is not None and rep.exact))
        probes: list[tuple[str, Any, str]] = [("reliability", img, p["q"])]
        probes += [("paraphrase", img, q) for q in question_templates(p["q"], 4)]
        probes += [("held_out_phrasing", img, q) for q in HELD_OUT[kind]]
        probes += [("other_picture", images[i], p["q"]) for i in p["same"]]
        probes += [("held_out_rendering", r, p["q"]) for r in renderings(img)]
        probes += [("other_picture_x_phrasing", images[i], q) for i in p["same"] for q in HELD_OUT[kind][:2]]
        anchor = mem.keys_of(eid)[0][:1]
        keys = np.repeat(anchor, len(probes), axis=0)
        routed = mem.route_ids(keys=keys)
        misrouted += int((routed != eid).sum())
        with torch.no_grad():
            out = em.answer([x[1] for x in probes], [x[2] for x in probes], max_new_tokens=4, route_keys=keys)
        for (k, _, _), a in zip(probes, out, strict=True):
            hits.setdefault(k, []).append(a.strip().lower() == p["new"])
        log.info("%s: edit %d (%s -> %s) tuned in %.2fs", name, eid, p["q"], p["new"], tune_s[-1])
    return {
        "variant": name,
        "fields": fields,
        "fidelity": {k: float(np.mean(v)) for k, v in hits.items()},
        "probes": {k: len(v) for k, v in hits.items()},
        "tune_s_mean": float(np.mean(tune_s)),
        "tune_exact": float(np.mean(exact)),
        "misrouted_probes": misrouted,
    }


KINDS = [
    "reliability",
    "paraphrase",
    "held_out_phrasing",
    "other_picture",
    "held_out_rendering",
    "other_picture_x_phrasing",
]


def markdown(res: dict) -> str:
    lines = [
        f"Forced fidelity (the edit's adapter injected on every probe), {res['edits']} edits on easy-vqa "
        "test pictures, shipped LLaVA + CLIP, exact match of the new answer. Held-out phrasings and "
        "renderings are used by no training, tuning or calibration.",
        "",
        "| variant | " + " | ".join(KINDS) + " | tune s / edit | tuning exact |",
        "|---" * (len(KINDS) + 3) + "|",
    ]
    for r in res["variants"]:
        f = r["fidelity"]
        lines.append(
            f"| {r['variant']} | "
            + " | ".join(f"{f.get(k, float('nan')):.3f}" for k in KINDS)
            + f" | {r['tune_s_mean']:.2f} | {r['tune_exact']:.2f} |"
        )
    lines += [
        "",
        "Probes per kind: " + ", ".join(f"{k} {n}" for k, n in res["variants"][0]["probes"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--max-steps", type=int, default=300, help="tuning budget in steps (AdapterConfig.max_steps)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    test = load_split("test")
    plan = _plan_edits(test, args.edits, args.seed)
    t0 = time.time()
    out = [run_variant(v, VARIANTS[v], plan, test[3], args.max_steps) for v in args.variants]
    res = {"edits": len(plan), "variants": out, "seconds": round(time.time() - t0, 1), "seed": args.seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
