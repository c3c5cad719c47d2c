"""How should an image and a question be fused into one routing key? Measured on easy-vqa.

Each *edit* is an (image, question) pair from easy-vqa's training split (64x64 shapes; 107
question phrasings). Every edit gets probes:

- positives: the same image with a **rephrased** question (another phrasing that asks the
  same fact, e.g. "what color is the shape?" / "what is the color of the shape?"), and
  **another image** of the same shape and colour with the same question;
- hard negatives: the **same image with another question** (a different fact), and
  **another image** (different shape and colour) **with the same question**;
- single-modality probes: the rephrased question alone (text-only) and the other image of the
  same subject alone (image-only), against the text / image of a negative alone;
- cross-modal reach: a caption of the edit's image ("a red circle") alone, against a caption
  of another subject. Only a key that keeps text and image in one shared space can score
  this above 0.5: the question of most edits does not name the subject of its image.

Reported per encoder, fusion rule and image weight: recall@1 of each positive kind (the
nearest edit is the probe's edit or an equivalent one: same shape, colour and fact), and
the AUC separating positive from negative cosine scores (all, and per negative kind), plus
the text-only and image-only AUCs. ``sum`` at w=0 / w=1 are the text-only / image-only key
baselines.

Encoders (``--encoders``): ``esg-tiny-clip`` (random weights), ``esg-tiny-clip@easyvqa`` (the
same model aligned for ``--train-steps`` on easy-vqa's *test* images against captions such
as "a red circle", then saved and reloaded through ``local-dir:``: a small but real shared
image-text space), and both composed with MiniLM for the text. Any other spec works too,
e.g. ``"ViT-B-32:/path/weights.safetensors"`` where real CLIP weights exist.

Honesty note: random ``esg-tiny-clip`` features are nearly constant across these images
(mean pairwise cosine ~0.98), so its rows show the rules' mechanics, not semantics; the
aligned model's text tower has seen captions only, never questions. Neither is a trained
CLIP. The image-key baseline's R@1 on rephrasings is trivially 1 (the probe reuses the
edit's image). What the runs show and why the defaults follow from it is written in
``esg_memory/encoders/base.py`` (CLIP: sum) and ``composite.py`` (composite: concat).

Usage: python benchmarks/bench_fusion.py [--quick] [--edits N] [--encoders SPEC ...]
Writes benchmarks/results/bench_fusion.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
WEIGHTS = (0.3, 0.5, 0.7)


def fact_of(q: str) -> tuple[str, str]:
    """The fact a question asks: ('color', ''), ('shape', ''), ('has', Y) or ('not', Y)."""
    if re.fullmatch(r"what (color is the \w+|is the color of the \w+)\?", q):
        return ("color", "")
    if q.startswith("what"):
        return ("shape", "")
    word = next(w for w in re.findall(r"\w+", q) if w in COLORS or w in SHAPES)
    negated = bool(re.search(r"\bnot\b", q)) or q.startswith("is no ")
    return ("not" if negated else "has", word)


def fits(q: str, shape: str, color: str) -> bool:
    """Whether phrasing ``q`` presupposes nothing false about an image (no 'the circle' for a square)."""
    for s in SHAPES:
        if f"the {s}" in q and s != shape:
            return False
    m = re.fullmatch(r"what is the (\w+) shape\?", q)
    return not (m and m.group(1) != color)


def load_easy_vqa(
    split: str = "train",
) -> tuple[list[str], dict[int, str], dict[int, tuple[str, str]], dict[int, list[str]]]:
    import easy_vqa

    qs, answers, ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    attrs: dict[int, dict[str, str]] = defaultdict(dict)
    per_image: dict[int, list[str]] = defaultdict(list)
    for q, a, i in zip(qs, answers, ids, strict=True):
        kind = fact_of(q)[0]
        if kind in ("color", "shape"):
            attrs[i][kind] = a
        per_image[i].append(q)
    known = {i: (d["shape"], d["color"]) for i, d in attrs.items() if "shape" in d and "color" in d}
    return sorted(set(qs)), paths, known, per_image


def build_cases(n_edits: int, seed: int) -> list[dict]:
    phrasings, paths, known, per_image = load_easy_vqa()
    rng = np.random.default_rng(seed)
    by_subject: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, sc in known.items():
        by_subject[sc].append(i)
    by_fact: dict[tuple[str, str], list[str]] = defaultdict(list)
    for q in phrasings:
        by_fact[fact_of(q)].append(q)
    ids = np.array(sorted(known))
    cases: list[dict] = []
    for i in rng.permutation(ids):
        i = int(i)
        shape, color = known[i]
        same = [j for j in by_subject[(shape, color)] if j != i]
        qs = [q for q in per_image[i] if fits(q, shape, color)]
        if not same or not qs:
            continue
        q = qs[int(rng.integers(len(qs)))]
        f = fact_of(q)
        reph = [p for p in by_fact[f] if p != q and fits(p, shape, color)]
        other_q = [p for p in phrasings if fact_of(p) != f and fits(p, shape, color)]
        far = [j for (s, c), js in by_subject.items() if s != shape and c != color for j in js]
        j_far = far[int(rng.integers(len(far)))] if far else None
        if not reph or j_far is None:
            continue
        cases.append(
            {
                "image": paths[i],
                "question": q,
                "subject": (shape, color, *f),
                "rephrase": reph[int(rng.integers(len(reph)))],
                "other_image": paths[same[int(rng.integers(len(same)))]],
                "other_question": other_q[int(rng.integers(len(other_q)))],
                "far_image": paths[j_far],
                "caption": f"a {color} {shape}",
                "far_caption": "a {1} {0}".format(*known[j_far]),
            }
        )
        if len(cases) == n_edits:
            break
    return cases


def train_tiny_clip(steps: int, seed: int, out_dir: Path):
    """Give esg-tiny-clip a real (small) shared image-text space, then load it like a user would.

    Trained on easy-vqa's *test* split (the edits come from the train split): each image's
    embedding is pulled towards the text embedding of its caption ("a red circle") against
    the 23 other shape/colour captions (CLIP's image-to-text loss over the caption set).
    """
    import torch
    from PIL import Image

    from esg_memory.encoders import TINY_CLIP_NAME, ClipKeyEncoder

    _, paths, known, _ = load_easy_vqa("test")
    ids = sorted(known)
    classes = sorted(set(known.values()))
    y = torch.tensor([classes.index(known[i]) for i in ids])
    enc = ClipKeyEncoder(TINY_CLIP_NAME, seed=seed, cache_size=0)
    x = torch.stack([enc.preprocess(Image.open(paths[i]).convert("RGB")) for i in ids])
    tokens = enc.tokenizer([f"a {color} {shape}" for shape, color in classes])
    model = enc.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    loss = acc = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(ids), (64,), generator=g)
        logits = (
            20.0 * model.encode_image(x[idx], normalize=True) @ model.encode_text(tokens, normalize=True).T
        )
        loss_t = torch.nn.functional.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        loss = float(loss_t.detach())
    model.eval()
    with torch.no_grad():
        pred = (model.encode_image(x, normalize=True) @ model.encode_text(tokens, normalize=True).T).argmax(1)
        acc = float((pred == y).float().mean())
    for p in model.parameters():
        p.requires_grad_(False)
    enc.save_pretrained(out_dir)
    return {"steps": steps, "final_loss": round(loss, 4), "zero_shot_acc_24_classes": round(acc, 4)}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = np.sort(pos), np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def evaluate(enc, cases: list[dict]) -> dict:
    img = [c["image"] for c in cases]
    q = [c["question"] for c in cases]
    e = enc.encode(img, q)
    probes = {
        "rephrase": enc.encode(img, [c["rephrase"] for c in cases]),
        "other_image": enc.encode([c["other_image"] for c in cases], q),
        "same_image_other_q": enc.encode(img, [c["other_question"] for c in cases]),
        "other_image_same_q": enc.encode([c["far_image"] for c in cases], q),
        "text_only_pos": enc.encode_texts([c["rephrase"] for c in cases]),
        "text_only_neg": enc.encode_texts([c["other_question"] for c in cases]),
        "image_only_pos": enc.encode_images([c["other_image"] for c in cases]),
        "image_only_neg": enc.encode_images([c["far_image"] for c in cases]),
        "caption_pos": enc.encode_texts([c["caption"] for c in cases]),
        "caption_neg": enc.encode_texts([c["far_caption"] for c in cases]),
    }
    own = {k: np.einsum("nd,nd->n", v, e) for k, v in probes.items()}
    subj = [c["subject"] for c in cases]
    out: dict[str, float] = {}
    for kind in ("rephrase", "other_image"):
        top = (probes[kind] @ e.T).argmax(1)
        out[f"r1_{kind}"] = float(np.mean([subj[t] == subj[i] for i, t in enumerate(top)]))
    pos = np.concatenate([own["rephrase"], own["other_image"]])
    out["auc_all"] = auc(pos, np.concatenate([own["same_image_other_q"], own["other_image_same_q"]]))
    out["auc_same_image"] = auc(pos, own["same_image_other_q"])
    out["auc_same_question"] = auc(pos, own["other_image_same_q"])
    out["auc_text_only"] = auc(own["text_only_pos"], own["text_only_neg"])
    out["auc_image_only"] = auc(own["image_only_pos"], own["image_only_neg"])
    # cross-modal reach: a caption of the edit's *image* ("a red circle"), not its question
    out["auc_caption"] = auc(own["caption_pos"], own["caption_neg"])
    out["mean_pos_cos"] = float(pos.mean())
    out["mean_text_only_pos_cos"] = float(own["text_only_pos"].mean())
    return out


def variants(enc):
    """(fuse, w, encoder view) for every rule and weight, plus the single-tower baselines."""
    from esg_memory.encoders import ClipKeyEncoder, CompositeKeyEncoder

    def make(fuse: str, w: float):
        if isinstance(enc, ClipKeyEncoder):
            return enc.with_fusion(fuse, w)
        if isinstance(enc, CompositeKeyEncoder):
            return CompositeKeyEncoder(enc.text_encoder, enc.image_encoder, fuse=fuse, image_weight=w)
        raise SystemExit(f"cannot sweep fusion of {type(enc).__name__}")

    yield "sum", 0.0, make("sum", 0.0)
    yield "sum", 1.0, make("sum", 1.0)
    for fuse in ("sum", "concat"):
        for w in WEIGHTS:
            yield fuse, w, make(fuse, w)
    yield "product", None, make("product", 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="150 edits (CI-sized)")
    ap.add_argument("--edits", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--encoders",
        nargs="+",
        default=[
            "esg-tiny-clip",
            "esg-tiny-clip@easyvqa",
            "minilm+esg-tiny-clip",
            "minilm+esg-tiny-clip@easyvqa",
        ],
        help="encoder specs; 'esg-tiny-clip@easyvqa' is the tiny CLIP after --train-steps of alignment",
    )
    ap.add_argument("--train-steps", type=int, default=None, help="alignment steps (default 400, quick 150)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI box has 2 shared cores)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_fusion.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    # no hub look-ups: everything this benchmark loads ships with installed packages
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from esg_memory.encoders import create_encoder

    torch.set_num_threads(args.threads)
    n = 150 if args.quick else args.edits
    t0 = time.perf_counter()
    cases = build_cases(n, args.seed)
    rows = []
    training = None
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench_fusion_"))
    if any("@easyvqa" in spec for spec in args.encoders):
        steps = args.train_steps if args.train_steps is not None else (150 if args.quick else 400)
        t = time.perf_counter()
        training = train_tiny_clip(steps, args.seed, tmp / "tiny-easyvqa")
        training["seconds"] = round(time.perf_counter() - t, 1)
        print(f"aligned esg-tiny-clip on easy-vqa test images: {training}")
    for spec in args.encoders:
        base = create_encoder(spec.replace("esg-tiny-clip@easyvqa", f"local-dir:{tmp / 'tiny-easyvqa'}"))
        t = time.perf_counter()
        for fuse, w, enc in variants(base):
            r = evaluate(enc, cases)
            rows.append({"encoder": spec, "fuse": fuse, "image_weight": w, "dim": enc.dim, **r})
        rows[-1]["seconds_for_sweep"] = round(time.perf_counter() - t, 2)
    cols = [
        ("r1_rephrase", "R@1 reph"),
        ("r1_other_image", "R@1 other img"),
        ("auc_all", "AUC all"),
        ("auc_same_image", "AUC vs same img"),
        ("auc_same_question", "AUC vs same q"),
        ("auc_text_only", "AUC text-only"),
        ("auc_image_only", "AUC img-only"),
        ("auc_caption", "AUC caption→img"),
    ]
    lines = [
        "| encoder | fuse | w | dim | " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---|" * (4 + len(cols)),
    ]
    for r in rows:
        w = "-" if r["image_weight"] is None else f"{r['image_weight']:.1f}"
        note = (
            {0.0: " (text key)", 1.0: " (image key)"}.get(r["image_weight"], "") if r["fuse"] == "sum" else ""
        )
        vals = " | ".join(f"{r[k]:.3f}" for k, _ in cols)
        lines.append(f"| {r['encoder']} | {r['fuse']}{note} | {w} | {r['dim']} | {vals} |")
    table = "\n".join(lines)
    print(f"easy-vqa fusion benchmark: {len(cases)} edits, seed {args.seed}\n")
    print(table)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.1f} s (torch threads {args.threads})")
    result = {
        "benchmark": "bench_fusion",
        "format_version": 1,
        "dataset": "easy-vqa train (PyPI easy_vqa)",
        "edits": len(cases),
        "seed": args.seed,
        "quick": args.quick,
        "encoders": args.encoders,
        "tiny_clip_alignment": training,
        "rows": rows,
        "table_markdown": table,
        "seconds_total": round(total, 2),
        "machine": {"python": platform.python_version(), "torch_threads": args.threads},
        "note": "esg-tiny-clip has random weights: its numbers show mechanics, not semantics. "
        "esg-tiny-clip@easyvqa is the same model briefly aligned on easy-vqa test images (a small "
        "shared space); still far from a real CLIP.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
