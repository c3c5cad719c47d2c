"""What the embedded default models know, measured on easy-vqa's held-out test split.

- **LLaVA accuracy** (``esg-easyvqa-llava``, loaded as shipped: fp16 weights -> float32): greedy
  answers (``max_new_tokens=4``) to the test questions, exact match after stripping; overall and by
  question kind (colour / shape / yes-no). Baselines measured in the same run: the blind prior
  (each question's most frequent training answer, no picture) and the majority answer.
- **Encoder retrieval** (``esg-easyvqa-clip`` through ``ClipKeyEncoder``, the library path): for
  each test picture whose shape and colour its questions determine, is its nearest training picture
  (cosine of image keys) of the same shape and colour? Baselines: raw pixels (cosine of the
  normalised 64x64x3 vectors) and the random-weight ``esg-tiny-clip``.
- **Question keys**: for each distinct question, is its nearest other question (text keys) a
  paraphrase, i.e. one with the same answer on every subject? Baseline: the random ``esg-tiny-clip``.
- Timing: LLaVA answers/s and encoder images/s on this machine (no cross-machine claims).

Usage: python benchmarks/bench_default.py [--limit N] [--out benchmarks/results/bench_default.json]
Data: PyPI ``easy-vqa`` (MIT; the ``eval`` extra). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("bench_default")


def question_kind(q: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "colour" if "color" in q else "shape"


def load_split(name: str):
    import easy_vqa
    from PIL import Image

    get_q = easy_vqa.get_train_questions if name == "train" else easy_vqa.get_test_questions
    get_p = easy_vqa.get_train_image_paths if name == "train" else easy_vqa.get_test_image_paths
    qs, ans, ids = get_q()
    paths = get_p()
    images = {i: Image.open(p).convert("RGB") for i, p in paths.items()}
    return qs, ans, ids, images


def llava_accuracy(test, train, limit: int, batch: int) -> dict:
    import torch

    from esg_memory.pretrained import format_prompt, load_easyvqa_llava

    qs, ans, ids, images = test
    n = min(limit, len(qs)) if limit else len(qs)
    model, proc = load_easyvqa_llava()
    preds: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        ks = range(i, min(n, i + batch))
        enc = proc(
            text=[format_prompt(qs[k]) for k in ks],
            images=[images[ids[k]] for k in ks],
            return_tensors="pt",
            padding=True,
        )
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id
            )
        new = out[:, enc["input_ids"].shape[1] :]
        preds += [s.strip() for s in proc.batch_decode(new, skip_special_tokens=True)]
    dt = time.perf_counter() - t0
    gold = ans[:n]
    correct = np.array([p == g for p, g in zip(preds, gold, strict=True)])
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for k in range(n):
        by_kind[question_kind(qs[k], gold[k])].append(bool(correct[k]))
    # blind baselines from the training split: no picture at all
    tq, ta = train[0], train[1]
    per_q: dict[str, Counter] = defaultdict(Counter)
    for q, a in zip(tq, ta, strict=True):
        per_q[q][a] += 1
    majority = Counter(ta).most_common(1)[0][0]
    prior = [per_q[qs[k]].most_common(1)[0][0] if per_q[qs[k]] else majority for k in range(n)]
    return {
        "n_questions": n,
        "accuracy": float(correct.mean()),
        "accuracy_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "n_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "baseline_blind_prior": float(np.mean([p == g for p, g in zip(prior, gold, strict=True)])),
        "baseline_majority": float(np.mean([majority == g for g in gold])),
        "answers_per_s": n / dt,
        "unparsed_answers": int(sum(p not in set(ta) for p in preds)),
    }


def _labels(split) -> dict[int, int]:
    from esg_memory.pretrained import EASYVQA_COLOURS, EASYVQA_SHAPES, derive_subjects

    classes = {(s, c): k for k, (s, c) in enumerate((s, c) for s in EASYVQA_SHAPES for c in EASYVQA_COLOURS)}
    subj = derive_subjects(split[0], split[1], split[2])
    return {i: classes[v] for i, v in subj.items() if v in classes}


def retrieval(train, test, encoders: dict) -> dict:
    tr_lab, te_lab = _labels(train), _labels(test)
    tr_ids, te_ids = sorted(tr_lab), sorted(te_lab)
    tr_y = np.array([tr_lab[i] for i in tr_ids])
    te_y = np.array([te_lab[i] for i in te_ids])
    out: dict = {"n_gallery": len(tr_ids), "n_queries": len(te_ids), "top1": {}, "images_per_s": {}}
    for name, enc in encoders.items():
        t0 = time.perf_counter()
        g = enc([train[3][i] for i in tr_ids])
        q = enc([test[3][i] for i in te_ids])
        out["images_per_s"][name] = (len(tr_ids) + len(te_ids)) / (time.perf_counter() - t0)
        out["top1"][name] = float((tr_y[(q @ g.T).argmax(1)] == te_y).mean())
    return out


def paraphrase_top1(train, text_encoders: dict) -> dict:
    from esg_memory.pretrained import EASYVQA_COLOURS, EASYVQA_SHAPES

    lab = _labels(train)
    classes = len(EASYVQA_SHAPES) * len(EASYVQA_COLOURS)
    table: dict[tuple[str, int], str] = {}
    for q, a, i in zip(train[0], train[1], train[2], strict=True):
        if i in lab:
            table[(q, lab[i])] = a
    qs = sorted(set(train[0]))
    sig = [tuple(table.get((q, k), "") for k in range(classes)) for q in qs]
    has_para = np.array([sum(s == t for t in sig) > 1 for s in sig])
    out: dict = {"n_questions": int(has_para.sum()), "top1": {}}
    for name, enc in text_encoders.items():
        e = enc(qs)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        nn = sim.argmax(1)
        hit = np.array([sig[j] == sig[k] for k, j in enumerate(nn)])
        out["top1"][name] = float(hit[has_para].mean())
    return out


PARAPHRASES = {
    "what color is the shape?": "what is the color of the shape?",
    "what is the color of the shape?": "what color is the shape?",
    "what shape is in the image?": "what shape does the image contain?",
    "what shape does the image contain?": "what shape is present?",
    "what shape is present?": "what shape is in the image?",
}


def edit_stream(train, test, n_edits: int, seed: int) -> dict:
    """Edits "for this picture, this question now has that answer" on the shipped models, one by one.

    Each edit takes a test picture of a new subject and a colour or shape question, and asks for
    another answer of the same kind. After all edits (memory of n_edits, tuned adapters):
    reliability (edit input), generalization (a rephrased question; the same question on other
    test pictures of the same shape and colour), locality (the same question on pictures of other
    subjects; other questions about the edited picture), locality as "answer unchanged vs the
    pre-edit model".
    """
    import torch

    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.model import EditedModel
    from esg_memory.pretrained import (
        EASYVQA_CLIP,
        EASYVQA_COLOURS,
        EASYVQA_SHAPES,
        load_easyvqa_llava,
        pretrained_path,
    )

    qs, ans, ids, images = test
    lab = _labels(test)
    by_subject: dict[int, list[int]] = defaultdict(list)
    for i in sorted(lab):
        by_subject[lab[i]].append(i)
    questions_of: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, i in zip(qs, ans, ids, strict=True):
        questions_of[i].append((q, a))
    rng = np.random.default_rng(seed)
    subjects = [k for k in sorted(by_subject) if len(by_subject[k]) >= 3]
    rng.shuffle(subjects)
    plan = []
    for k in subjects[:n_edits]:
        img_id, *others = by_subject[k]
        q = ["what color is the shape?", "what shape is in the image?"][len(plan) % 2]
        shape, colour = EASYVQA_SHAPES[k // len(EASYVQA_COLOURS)], EASYVQA_COLOURS[k % len(EASYVQA_COLOURS)]
        pool = EASYVQA_COLOURS if "color" in q else EASYVQA_SHAPES
        old = colour if "color" in q else shape
        new = str(rng.choice([x for x in pool if x != old]))
        other_qs = [x for x, _ in questions_of[img_id] if x not in (q, PARAPHRASES[q])][:2]
        foreign = [by_subject[j][0] for j in subjects if j != k][:3]
        plan.append({"image": img_id, "q": q, "new": new, "same": others[:2], "other_q": other_qs,
                     "foreign": foreign})
    model, proc = load_easyvqa_llava()
    em = EditedModel.wrap(model, proc, encoder=ClipKeyEncoder(f"local-dir:{pretrained_path(EASYVQA_CLIP)}"))
    probes: list[tuple[str, int, str, int]] = []  # (kind, picture, question, edit index)
    for e, p in enumerate(plan):
        probes.append(("reliability", p["image"], p["q"], e))
        probes.append(("rephrase", p["image"], PARAPHRASES[p["q"]], e))
        probes += [("same_subject", i, p["q"], e) for i in p["same"]]
        probes += [("loc_other_subject", i, p["q"], e) for i in p["foreign"]]
        probes += [("loc_other_question", p["image"], q, e) for q in p["other_q"]]

    def ask():
        return em.answer(images=[images[i] for _, i, _, _ in probes], prompts=[q for _, _, q, _ in probes],
                         max_new_tokens=4)

    with torch.no_grad(), em.disable_edits():
        before = ask()
    t0 = time.perf_counter()
    for p in plan:
        em.add_edit(images[p["image"]], p["q"], p["new"], tune="sync")
    edit_s = (time.perf_counter() - t0) / max(1, len(plan))
    after = ask()
    hits: dict[str, list[bool]] = defaultdict(list)
    for (kind, _, _, e), b, a in zip(probes, before, after, strict=True):
        hits[kind].append(a == plan[e]["new"] if not kind.startswith("loc") else a == b)
    return {
        "n_edits": len(plan),
        "seconds_per_edit": edit_s,
        "rates": {k: float(np.mean(v)) for k, v in hits.items()},
        "n_probes": {k: len(v) for k, v in hits.items()},
    }


def pixel_embed(images) -> np.ndarray:
    x = np.stack([np.asarray(im, dtype=np.float32).ravel() / 255.0 for im in images])
    x -= x.mean(1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="test questions for the LLaVA accuracy (0: all)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--edits", type=int, default=0, help="also run an edit stream of N edits (wrapper)")
    default_out = Path(__file__).resolve().parent / "results" / "bench_default.json"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.pretrained import EASYVQA_CLIP, EASYVQA_LLAVA, pretrained_info, pretrained_path

    train, test = load_split("train"), load_split("test")
    trained = ClipKeyEncoder(f"local-dir:{pretrained_path(EASYVQA_CLIP)}", cache_size=0)
    tiny = ClipKeyEncoder("esg-tiny-clip", cache_size=0)
    res: dict = {
        "benchmark": "bench_default",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "models": {n: pretrained_info(n) for n in (EASYVQA_CLIP, EASYVQA_LLAVA)},
    }
    res["retrieval"] = retrieval(
        train,
        test,
        {
            EASYVQA_CLIP: trained.encode_images,
            "raw pixels": pixel_embed,
            "esg-tiny-clip (random)": tiny.encode_images,
        },
    )
    res["paraphrase"] = paraphrase_top1(
        train, {EASYVQA_CLIP: trained.encode_texts, "esg-tiny-clip (random)": tiny.encode_texts}
    )
    res["llava"] = llava_accuracy(test, train, args.limit, args.batch)
    if args.edits:
        res["edit_stream"] = edit_stream(train, test, args.edits, seed=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2), encoding="utf-8")
    print(render(res))
    print(f"\nJSON: {args.out}")
    return 0


def render(res: dict) -> str:
    lv, rt, pp = res["llava"], res["retrieval"], res["paraphrase"]
    lines = [
        "| measure (easy-vqa test split) | value | baselines (same run) |",
        "|---|---|---|",
        f"| LLaVA accuracy, {lv['n_questions']} questions | **{lv['accuracy']:.3f}** | "
        f"blind prior {lv['baseline_blind_prior']:.3f}, majority {lv['baseline_majority']:.3f} |",
    ]
    for k, v in lv["accuracy_by_kind"].items():
        lines.append(f"| — {k} ({lv['n_by_kind'][k]}) | {v:.3f} | |")
    top = rt["top1"]
    base = ", ".join(f"{k} {v:.3f}" for k, v in top.items() if k != "esg-easyvqa-clip")
    lines.append(
        f"| retrieval top-1 same shape & colour, {rt['n_queries']} test vs {rt['n_gallery']} train pictures "
        f"| **{top['esg-easyvqa-clip']:.3f}** | {base} |"
    )
    ptop = pp["top1"]
    pbase = ", ".join(f"{k} {v:.3f}" for k, v in ptop.items() if k != "esg-easyvqa-clip")
    lines.append(
        f"| question nearest neighbour is a paraphrase, {pp['n_questions']} questions | "
        f"**{ptop['esg-easyvqa-clip']:.3f}** | {pbase} |"
    )
    threads = res["machine"]["threads"]
    lines.append(f"| LLaVA answers/s (CPU, {threads} thread) | {lv['answers_per_s']:.1f} | |")
    ips = rt["images_per_s"]
    lines.append(
        "| encoder images/s | "
        + f"{ips['esg-easyvqa-clip']:.0f} | esg-tiny-clip {ips['esg-tiny-clip (random)']:.0f} |"
    )
    if "edit_stream" in res:
        es = res["edit_stream"]
        for k, v in es["rates"].items():
            what = "answer unchanged vs pre-edit" if k.startswith("loc") else "edited answer given"
            n = es["n_probes"][k]
            lines.append(f"| edit stream ({es['n_edits']} edits) {k}: {what} ({n}) | {v:.3f} | |")
        lines.append(f"| edit stream seconds per edit (tuned) | {es['seconds_per_edit']:.1f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
