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
- **Edit stream** (``--edits N``, one edit per subject, at most 24): reliability, generalization
  (rephrased question; other test pictures of the same subject) and locality (same question on other
  subjects; other questions on the edited picture; "answer unchanged vs the pre-edit model") through
  ``EditedModel`` with tuned adapters. Ours uses the shipped train-split locality pool
  (``easyvqa_locality_pool`` + ``easyvqa_memory_config``); side by side, on the same probes and with
  the same adapters, the routing benchmark's baselines (``_routing_eval``): global threshold (1% and
  0 pool leak), GRACE's radii, text-only and image-only keys, always-nearest, plus ours without a pool
  and the bare model. Answer-level and routing-level rates for each.
- Timing: LLaVA answers/s and encoder images/s on this machine (no cross-machine claims).

Usage: python benchmarks/bench_default.py [--limit N] [--edits 24] [--out results/bench_default.json]
(a run with ``--limit`` keeps a fuller earlier LLaVA accuracy in the JSON; the limited one goes to
``llava_limited_run``; a run without ``--edits`` keeps the earlier edit stream).
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


def _plan_edits(test, n_edits: int, seed: int) -> list[dict]:
    """One edit per subject (colour and shape questions alternating) and its probes.

    Locality on other subjects uses the edit's question on a picture of another subject *that no
    edit covers with a question of the same kind* (else that probe would be another edit's
    generalization input, whose answer rightly changes), and never an edit's own picture.
    """
    from esg_memory.pretrained import EASYVQA_COLOURS, EASYVQA_SHAPES

    qs, ans, ids, _ = test
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
    kinds = ["what color is the shape?", "what shape is in the image?"]
    edited = {k: kinds[e % 2] for e, k in enumerate(subjects[:n_edits])}
    plan = []
    for k in subjects[:n_edits]:
        img_id, *others = by_subject[k]
        q = edited[k]
        shape, colour = EASYVQA_SHAPES[k // len(EASYVQA_COLOURS)], EASYVQA_COLOURS[k % len(EASYVQA_COLOURS)]
        pool = EASYVQA_COLOURS if "color" in q else EASYVQA_SHAPES
        old = colour if "color" in q else shape
        new = str(rng.choice([x for x in pool if x != old]))
        other_qs = [x for x, _ in questions_of[img_id] if x not in (q, PARAPHRASES[q])][:2]
        foreign = [by_subject[j][-1] for j in subjects if j != k and edited.get(j) != q][:3]
        plan.append({"image": img_id, "q": q, "new": new, "same": others[:2], "other_q": other_qs,
                     "foreign": foreign})
    return plan


def edit_stream(train, test, n_edits: int, seed: int) -> dict:
    """Edits "for this picture, this question now has that answer" on the shipped models, one by one.

    Each edit takes a test picture of a new subject and a colour or shape question, and asks for
    another answer of the same kind. After all edits (memory of n_edits, tuned adapters):
    reliability (edit input), generalization (a rephrased question; the same question on other
    test pictures of the same shape and colour), locality (the same question on pictures of other
    subjects; other questions about the edited picture), locality as "answer unchanged vs the
    pre-edit model".

    Ours uses the shipped locality pool (``easyvqa_locality_pool``, train pictures) with
    ``easyvqa_memory_config``. On the same probes, each routing baseline of the routing benchmark
    (``_routing_eval``: global threshold calibrated on the same pool, GRACE's radii, text-only and
    image-only keys, always-nearest) and ours without a pool (library defaults) pick an edit per
    probe; answers are then generated with that edit's tuned adapter injected (the adapters are
    the same for every router: they depend only on the edit). Routing-level rates come with them.
    """
    import torch

    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.eval.baselines import RoutedMemory, calibrate_global, grace_radii, nearest_rule
    from esg_memory.memory import EditMemory
    from esg_memory.model import EditedModel
    from esg_memory.pretrained import (
        EASYVQA_CLIP,
        easyvqa_locality_pool,
        easyvqa_memory_config,
        load_easyvqa_llava,
        pretrained_path,
    )

    images = test[3]
    plan = _plan_edits(test, n_edits, seed)
    model, proc = load_easyvqa_llava()
    enc = ClipKeyEncoder(f"local-dir:{pretrained_path(EASYVQA_CLIP)}")
    pool = easyvqa_locality_pool()
    cfg = easyvqa_memory_config()
    mem = EditMemory(enc, config=cfg, locality_pool=pool)
    em = EditedModel.wrap(model, proc, memory=mem, encoder=enc)
    probes: list[tuple[str, int, str, int]] = []  # (kind, picture, question, edit index)
    for e, p in enumerate(plan):
        probes.append(("reliability", p["image"], p["q"], e))
        probes.append(("rephrase", p["image"], PARAPHRASES[p["q"]], e))
        probes += [("same_subject", i, p["q"], e) for i in p["same"]]
        probes += [("loc_other_subject", i, p["q"], e) for i in p["foreign"]]
        probes += [("loc_other_question", p["image"], q, e) for q in p["other_q"]]
    p_img = [images[i] for _, i, _, _ in probes]
    p_txt = [q for _, _, q, _ in probes]

    def ask():
        return em.answer(images=p_img, prompts=p_txt, max_new_tokens=4)

    with torch.no_grad(), em.disable_edits():
        before = ask()
    t0 = time.perf_counter()
    ids = [em.add_edit(images[p["image"]], p["q"], p["new"], tune="sync") for p in plan]
    edit_s = (time.perf_counter() - t0) / max(1, len(plan))

    # routing decisions per method, as edit ids (-1: none)
    e_img = [images[p["image"]] for p in plan]
    e_txt = [p["q"] for p in plan]
    answers = [p["new"] for p in plan]
    idv = np.asarray(ids)
    pool_img = [str(x) for x, _ in pool]
    pool_txt = [t for _, t in pool]
    anchors, qk = enc.encode(e_img, e_txt), enc.encode(p_img, p_txt)
    anchors_t, qt = enc.encode_texts(e_txt), enc.encode_texts(p_txt)
    anchors_i, qi = enc.encode_images(e_img), enc.encode_images(p_img)
    pool_k = enc.encode(pool_img, pool_txt)
    tau = calibrate_global(anchors, pool_k, cfg.margin, budget=0.01)
    tau0 = calibrate_global(anchors, pool_k, cfg.margin)
    tau_t = calibrate_global(anchors_t, enc.encode_texts(pool_txt), cfg.margin, budget=0.01)
    tau_i = calibrate_global(anchors_i, enc.encode_images(pool_img), cfg.margin, budget=0.01)

    def as_ids(j: np.ndarray) -> np.ndarray:
        return np.where(j >= 0, idv[np.maximum(j, 0)], -1)

    bare = EditMemory(enc)  # library defaults: no locality pool (generic texts only)
    bare_ids = [
        bare.add(image=im, question=q, answer=a) for im, q, a in zip(e_img, e_txt, answers, strict=True)
    ]
    to_ours = dict(zip(bare_ids, ids, strict=True))
    routes = {
        "ours (shipped pool)": np.asarray(mem.route(images=p_img, texts=p_txt).edit_ids),
        "ours, no pool (library defaults)": np.asarray(
            [to_ours.get(int(x), -1) for x in bare.route(images=p_img, texts=p_txt).edit_ids]
        ),
        "global threshold (1% pool leak)": as_ids(nearest_rule(anchors, qk, tau)),
        "global threshold (0 pool leak)": as_ids(nearest_rule(anchors, qk, tau0)),
        "GRACE radii": as_ids(nearest_rule(anchors, qk, grace_radii(anchors, answers, 1.0 - tau))),
        "text-only key": as_ids(nearest_rule(anchors_t, qt, tau_t)),
        "image-only key": as_ids(nearest_rule(anchors_i, qi, tau_i)),
        "always nearest": as_ids(nearest_rule(anchors, qk, None)),
    }
    owner = np.asarray([ids[e] for _, _, _, e in probes])
    kinds = np.asarray([k for k, _, _, _ in probes])
    methods: dict = {
        "bare model (no edits)": {
            "rates": _answer_rates(probes, plan, before, before),
            "routing": None,
        }
    }
    for name, r in routes.items():
        if name.startswith("ours (shipped"):
            after = ask()
        else:
            real, em.memory = em.memory, RoutedMemory(mem, r)
            try:
                after = ask()
            finally:
                em.memory = real
        routing = {}
        for k in dict.fromkeys(kinds.tolist()):
            m = kinds == k
            # generalization: the right edit fires; locality: its owner (resp. any edit) fires
            routing[k] = float((r[m] == owner[m]).mean())
            if k.startswith("loc"):
                routing[k + "_any"] = float((r[m] >= 0).mean())
        methods[name] = {"rates": _answer_rates(probes, plan, before, after), "routing": routing}
    return {
        "n_edits": len(plan),
        "seconds_per_edit": edit_s,
        "memory_config": {"n_pool_images": cfg.n_pool_images, "pool_size": len(pool)},
        "thresholds": {"global_1pct": tau, "global_0": tau0, "text_only": tau_t, "image_only": tau_i},
        "rates": methods["ours (shipped pool)"]["rates"],
        "n_probes": {k: int((kinds == k).sum()) for k in dict.fromkeys(kinds.tolist())},
        "methods": methods,
    }


def _answer_rates(probes, plan, before: list[str], after: list[str]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for (kind, _, _, e), b, a in zip(probes, before, after, strict=True):
        hits[kind].append(a == plan[e]["new"] if not kind.startswith("loc") else a == b)
    return {k: float(np.mean(v)) for k, v in hits.items()}


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
    res = merge_previous(args.out, res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2), encoding="utf-8")
    print(render(res))
    print(f"\nJSON: {args.out}")
    return 0


def merge_previous(path: Path, res: dict) -> dict:
    """Keep what a fuller earlier run measured: a limited LLaVA run never replaces a larger one, and a
    run without ``--edits`` keeps the previous edit stream (each section says its own sizes)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return res
    if not isinstance(old, dict):
        return res
    prev = old.get("llava")
    if isinstance(prev, dict) and prev.get("n_questions", 0) > res["llava"]["n_questions"]:
        res["llava_limited_run"] = res["llava"]
        res["llava"] = prev
    if "edit_stream" not in res and "edit_stream" in old:
        res["edit_stream"] = old["edit_stream"]
    return res


def render_edit_stream(es: dict) -> str:
    """Ours vs the routing baselines on the same probes: answer-level, then routing-level rates."""
    kinds = list(es["n_probes"])
    head = " | ".join(f"{k} ({es['n_probes'][k]})" for k in kinds)
    lines = [
        f"Edit stream, {es['n_edits']} edits (easy-vqa test pictures); answer level: generalization = edited "
        "answer given, locality (loc_*) = answer unchanged vs the pre-edit model",
        "",
        f"| method | {head} |",
        "|---|" + "---|" * len(kinds),
    ]
    for name, m in es.get("methods", {"ours": {"rates": es["rates"]}}).items():
        cells = " | ".join(f"{m['rates'][k]:.3f}" for k in kinds)
        lines.append(f"| {name} | {cells} |")
    routed = {n: m["routing"] for n, m in es.get("methods", {}).items() if m.get("routing")}
    if routed:
        cols = [(k, k if not k.startswith("loc") else k + "_any") for k in kinds]
        lines += [
            "",
            "Routing level: generalization = the right edit fires; locality = any edit fires (lower: better)",
            "",
            "| method | " + " | ".join(c for _, c in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for name, r in routed.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for _, c in cols) + " |")
    lines.append("")
    lines.append(f"Seconds per edit (tuned adapter, CPU): {es['seconds_per_edit']:.1f}")
    return "\n".join(lines)


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
        lines += ["", render_edit_stream(res["edit_stream"])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
