"""Routing benchmark: does each edit fire exactly where it should, as a long stream of edits arrives?

Streams of real edit records (MMEdit E-VQA, E-IC and VLKEB dev slices) are added one by one to an
`EditMemory`; after each edit (*immediate*) and after the whole stream (*retention*) we route:

- generalization probes (should route to the edit): rephrased question on the edit's image, the
  edit's question on its "image_rephrase", and both together;
- unrelated inputs (should route nowhere): held-out Natural Questions (text) and OK-VQA (image+question);
- hard negatives (should not route to the edit they are built from): the edit's image with an
  unrelated question (the record's ``m_loc_q``; E-VQA/E-IC only — VLKEB's are generic questions of
  the same kind, i.e. rephrasings on this image) and the edit's question on another image (``m_loc``).

Text-side mode (the images are not available offline): an image is keyed by its *subject id* —
the COCO image id for MMEdit (its ``image_rephrase`` is generated from the same photo, so it has
the same id) and the ``m.<freebase id>`` folder for VLKEB (both photos show the same entity). Each
subject becomes a small PNG whose pixels are seeded by the id; the benchmark's image tower maps
its pixels to a seeded random unit vector. This is an oracle image recognizer: it makes image
generalization trivial and different subjects orthogonal, so the text side — real MiniLM
embeddings — carries all the difficulty. Keys fuse both as the normalised sum of unit vectors.

A second stream uses real pixels: easy-vqa images with the tiny offline CLIP (random weights), an
edit's image rephrasings being other images of the same shape and colour.

Baselines on the same keys, in the same run: one global threshold calibrated on the same locality
pool our scopes see (WISE/LTE-style; the lowest value letting at most 1% of that pool in, and a
strict variant letting none in), GRACE's epsilon rule (start at the global radius, grow on the same
answer, halve on conflict), text-only keys and image-only keys (each with its own 1%-calibrated
global threshold), and always-nearest.

    python benchmarks/bench_routing.py            # streams of 100 and 1000 edits (+ easy-vqa)
    python benchmarks/bench_routing.py --quick    # 100 only
    python benchmarks/bench_routing.py --big      # also all 1200 records the dev slices hold
Writes ``bench_routing.json``, ``bench_routing.md`` and ``bench_routing.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from _routing_data import (
    PixelFeatureTextEncoder,
    Rec,
    SubjectTextEncoder,
    load_pools,
    load_records,
    subject_png,
)
from _routing_eval import build_probes, calibrate_global, grace_radii, metrics, nearest_rule

from esg_memory.augment import question_templates
from esg_memory.config import MemoryConfig
from esg_memory.memory import EditMemory

log = logging.getLogger("bench_routing")
_COCO = re.compile(r"(\d{6,})\.(?:jpg|png)$")


def run_stream(
    name: str,
    recs: list[Rec],
    enc,
    pool: list,
    unrelated: list,
    cfg: MemoryConfig,
    checkpoints: list[int],
    png,
) -> dict:
    """Add ``recs`` one by one; evaluate ours and the baselines at each checkpoint."""
    pool_items = [(None if s is None else png(s), t) for s, t in pool]
    t0 = time.perf_counter()
    mem = EditMemory(enc, cfg, locality_pool=pool_items)
    probes_all = build_probes(recs, unrelated)

    def keys_of(kind: str) -> np.ndarray:
        ims, txs, _ = probes_all[kind]
        return enc.encode([None if s is None else png(s) for s in ims], txs)

    kinds = [k for k in probes_all if not k.startswith("_")]
    qk = {k: keys_of(k) for k in kinds}
    text_q = {k: enc.encode_texts(probes_all[k][1]) for k in kinds}
    img_q = {
        k: np.stack(
            [
                enc.encode_images([png(s)])[0] if s is not None else np.zeros(enc.dim, np.float32)
                for s in probes_all[k][0]
            ]
        )
        for k in kinds
    }
    anchors = enc.encode([png(r.subject) for r in recs], [r.src for r in recs])
    anchors_t = enc.encode_texts([r.src for r in recs])
    anchors_i = enc.encode_images([png(r.subject) for r in recs])
    pool_k = mem.snapshot(settle=False).pool.keys
    pool_t = np.stack([enc.encode_texts([t])[0] for _, t in pool])
    pool_i = np.stack([enc.encode_images([png(s)])[0] for s, _ in pool if s is not None])
    log.info("%s: encoded probes in %.1fs", name, time.perf_counter() - t0)

    ids: list[int] = []
    immediate_ok = []
    add_s = []
    results = []
    answers = [r.answer for r in recs]
    for i, r in enumerate(recs):
        t = time.perf_counter()
        ids.append(mem.add(image=png(r.subject), question=r.src, answer=r.answer))
        add_s.append(time.perf_counter() - t)
        sel = probes_all["gen"][2] == i
        got = mem.route(keys=qk["gen"][sel]).edit_ids
        immediate_ok.extend((got == ids[i]).tolist())
        n = i + 1
        if n not in checkpoints:
            continue
        id2i = {e: j for j, e in enumerate(ids)}

        def sub(kind: str, n=n):
            own = probes_all[kind][2]
            return np.ones(len(qk[kind]), bool) if own is None else own < n

        def ours(kind: str, n=n, id2i=id2i):
            m = sub(kind)
            e = mem.route(keys=qk[kind][m]).edit_ids
            return np.asarray([id2i.get(int(x), -1) for x in e])

        sub_probes = {
            k: (v[0], v[1], None if v[2] is None else v[2][sub(k)])
            for k, v in probes_all.items()
            if not k.startswith("_")
        }
        sub_probes["_gen_kind"] = probes_all["_gen_kind"][sub("gen")]
        sub_probes["_hard_kind"] = probes_all["_hard_kind"][sub("hard")]
        sub_probes["_source"] = probes_all["_source"]
        out = {"n_edits": n, "methods": {}}
        out["methods"]["ours"] = metrics({k: ours(k) for k in kinds}, answers[:n], sub_probes)
        out["methods"]["ours"]["conflicts"] = len(mem.conflicts()) if n <= 1000 else None
        tau0 = calibrate_global(anchors[:n], pool_k, cfg.margin)
        tau = calibrate_global(anchors[:n], pool_k, cfg.margin, budget=0.01)
        tau_t = calibrate_global(anchors_t[:n], pool_t, cfg.margin, budget=0.01)
        tau_i = calibrate_global(anchors_i[:n], pool_i, cfg.margin, budget=0.01)
        grace = grace_radii(anchors[:n], answers[:n], 1.0 - tau)
        rules = {
            "global_threshold": lambda k, n=n, tau=tau: nearest_rule(anchors[:n], qk[k][sub(k)], tau),
            "global_threshold_zero_pool_leak": lambda k, n=n, tau=tau0: nearest_rule(
                anchors[:n], qk[k][sub(k)], tau
            ),
            "grace": lambda k, n=n, g=grace: nearest_rule(anchors[:n], qk[k][sub(k)], g),
            "text_only_key": lambda k, n=n, tt=tau_t: nearest_rule(anchors_t[:n], text_q[k][sub(k)], tt),
            "image_only_key": lambda k, n=n, ti=tau_i: np.where(
                np.abs(img_q[k][sub(k)]).sum(1) > 0, nearest_rule(anchors_i[:n], img_q[k][sub(k)], ti), -1
            ),
            "always_nearest": lambda k, n=n: nearest_rule(anchors[:n], qk[k][sub(k)], None),
        }
        for mname, rule in rules.items():
            out["methods"][mname] = metrics({k: rule(k) for k in kinds}, answers[:n], sub_probes)
        out["thresholds"] = {
            "global": tau,
            "global_zero_pool_leak": tau0,
            "text_only": tau_t,
            "image_only": tau_i,
        }
        results.append(out)
        log.info(
            "%s n=%d ours recall %.3f leak %.4f | global recall %.3f leak %.4f",
            name,
            n,
            out["methods"]["ours"]["recall"],
            out["methods"]["ours"]["leak"],
            out["methods"]["global_threshold"]["recall"],
            out["methods"]["global_threshold"]["leak"],
        )
    thr = np.concatenate([mem.keys_of(e)[1] for e in ids])
    keys_per_edit = float(np.mean([len(mem.keys_of(e)[1]) for e in ids]))
    return {
        "stream": name,
        "n": len(recs),
        "immediate_recall": float(np.mean(immediate_ok)),
        "add_ms_median": 1000 * float(np.median(add_s)),
        "add_ms_p90": 1000 * float(np.percentile(add_s, 90)),
        "keys_per_edit": keys_per_edit,
        "threshold_quartiles": np.percentile(thr, [25, 50, 75]).tolist(),
        "checkpoints": results,
        "wall_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- easy-vqa (real pixels)
def easy_vqa_stream(n: int, enc, cfg: MemoryConfig, label: str) -> dict:
    """Edits on easy-vqa images; an edit's image rephrasings are other images of the same shape+colour."""
    import easy_vqa

    qs, ans, img_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    colour, shape = {}, {}
    for q, a, i in zip(qs, ans, img_ids, strict=True):
        if "color" in q and "what" in q:
            colour[i] = a
        if "shape" in q and "what" in q and "color" not in q:
            shape[i] = a
    subj = {i: (colour[i], shape[i]) for i in colour if i in shape}
    by_subj: dict = {}
    for i, s in sorted(subj.items()):
        by_subj.setdefault(s, []).append(i)
    rng = np.random.default_rng(0)
    keys = sorted(k for k, v in by_subj.items() if len(v) >= 3)
    qtypes = [
        ("what color is the shape?", "what is the color of the shape?"),
        ("what shape is in the image?", "which shape does the image contain?"),
    ]
    edits = [(s, qt) for s in keys for qt in qtypes][:n]
    recs, probes_gen, owners, probes_hard, hard_owners = [], [], [], [], []
    for e, (s, (q, reph)) in enumerate(edits):
        imgs = by_subj[s]
        pick = rng.choice(len(imgs), 3, replace=False)
        recs.append((paths[imgs[pick[0]]], q, f"edited-{s[0]}-{s[1]}-{e}"))
        for j in pick[1:]:
            probes_gen.append((paths[imgs[j]], reph))
            owners.append(e)
        # hard negatives: the same picture with a yes/no question, the same question on another subject
        other = [k for k in keys if k[0] != s[0] and k[1] != s[1]]
        o = other[int(rng.integers(len(other)))]
        probes_hard += [
            (paths[imgs[pick[0]]], "is there a blue shape in the image?"),
            (paths[by_subj[o][0]], q),
        ]
        hard_owners += [e, e]
    others = sorted(subj)
    unrel = [(paths[i], "is there a triangle in the image?") for i in rng.choice(others, 200, replace=False)]
    pool = [(paths[i], "does this image contain a circle?") for i in rng.choice(others, 200, replace=False)]
    mem = EditMemory(enc, cfg, locality_pool=pool)
    t0 = time.perf_counter()
    ids = [mem.add(image=p, question=q, answer=a) for p, q, a in recs]
    rg = mem.route(images=[p for p, _ in probes_gen], texts=[t for _, t in probes_gen])
    ru = mem.route(images=[p for p, _ in unrel], texts=[t for _, t in unrel])
    rh = mem.route(images=[p for p, _ in probes_hard], texts=[t for _, t in probes_hard])
    exp = np.asarray([ids[o] for o in owners])
    hexp = np.asarray([ids[o] for o in hard_owners])
    anchors = np.concatenate([mem.keys_of(e)[0][:1] for e in ids])
    tau = calibrate_global(anchors, mem.snapshot(settle=False).pool.keys, cfg.margin, budget=0.01)
    gg = np.asarray(ids)[np.maximum(nearest_rule(anchors, rg.keys, tau), 0)]
    gg = np.where(nearest_rule(anchors, rg.keys, tau) >= 0, gg, -1)
    gu = nearest_rule(anchors, ru.keys, tau)
    gh = nearest_rule(anchors, rh.keys, tau)
    gh = np.where(gh >= 0, np.asarray(ids)[np.maximum(gh, 0)], -1)
    return {
        "stream": label,
        "n": len(recs),
        "recall": float((rg.edit_ids == exp).mean()),
        "wrong_edit": float(((rg.edit_ids >= 0) & (rg.edit_ids != exp)).mean()),
        "leak": float((ru.edit_ids >= 0).mean()),
        "hard_negative_leak": float((rh.edit_ids == hexp).mean()),
        "keys_per_edit": float(np.mean([len(mem.keys_of(e)[1]) for e in ids])),
        "global_threshold": {
            "recall": float((gg == exp).mean()),
            "leak": float((gu >= 0).mean()),
            "hard_negative_leak": float((gh == hexp).mean()),
            "tau": tau,
        },
        "wall_s": time.perf_counter() - t0,
        "encoder": enc.name,
    }


# ----------------------------------------------------------------------------- report
def table(res: dict) -> str:
    lines = []
    for s in res["streams"]:
        last = s["checkpoints"][-1]
        lines.append(
            f"\n### {s['stream']}: {s['n']} edits (immediate recall of ours {s['immediate_recall']:.3f}, "
            f"add median {s['add_ms_median']:.0f} ms, {s['keys_per_edit']:.2f} keys/edit)\n"
        )
        lines.append(
            "| method | recall | recall (exact id) | reliability | leak | hard-neg leak | wrong-edit | "
            "audit correct/under/over/fail |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for m, v in last["methods"].items():
            a = v["audit"]
            lines.append(
                f"| {m} | {v['recall']:.3f} | {v['recall_exact_id']:.3f} | {v['reliability']:.3f} | "
                f"{v['leak']:.4f} | {v['hard_negative_leak']:.4f} | {v['wrong_edit']:.4f} | "
                f"{a['correct']:.3f}/{a['under']:.3f}/{a['over']:.3f}/{a['fail']:.3f} |"
            )
        if last["methods"]["ours"].get("conflicts") is not None:
            lines.append(f"\nconflicts remaining (ours): {last['methods']['ours']['conflicts']}")
    for e in res.get("pixels", []):
        g = e["global_threshold"]
        lines.append(
            f"\n### {e['stream']}: {e['n']} edits — ours: recall {e['recall']:.3f}, leak {e['leak']:.4f}, "
            f"hard-neg leak {e['hard_negative_leak']:.4f}, wrong-edit {e['wrong_edit']:.4f}, "
            f"{e['keys_per_edit']:.2f} keys/edit; global threshold (1% pool budget): "
            f"recall {g['recall']:.3f}, leak {g['leak']:.4f}, hard-neg leak {g['hard_negative_leak']:.4f}"
        )
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    """Recall, leak and hard-negative leak against the number of edits (longest stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    s = max(res["streams"], key=lambda x: x["n"])
    xs = [c["n_edits"] for c in s["checkpoints"]]
    panels = [
        ("recall", "generalization recall"),
        ("leak", "leak (unrelated routed)"),
        ("hard_negative_leak", "hard-negative leak"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in s["checkpoints"][0]["methods"]:
            ax.plot(xs, [c["methods"][m][key] for c in s["checkpoints"]], marker="o", label=m)
        ax.set(xlabel="# edits", ylabel=label, title=f"{label} ({s['stream']})" if key == "recall" else label)
        if key != "recall":
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--quick", action="store_true", help="only the 100-edit stream")
    p.add_argument(
        "--big", action="store_true", help="also a stream of all 1200 records (the dev slices hold no more)"
    )
    p.add_argument("--no-pixels", action="store_true", help="skip the easy-vqa / tiny-CLIP stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--text-cache", type=Path, default=None, help="npz file reusing MiniLM text embeddings between runs"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("esg_memory").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from esg_memory.encoders import MiniLMTextEncoder

    data = args.data.resolve()
    recs = load_records(data)
    rng = np.random.default_rng(args.seed)
    mixed = recs["E-VQA"] + recs["VLKEB"] + recs["E-IC"]
    order = rng.permutation(len(mixed))
    mixed = [mixed[i] for i in order]
    pool, unrelated = load_pools(data)
    enc = SubjectTextEncoder(MiniLMTextEncoder())
    cfg = MemoryConfig()
    pngs: dict[str, bytes] = {}

    def png(s: str) -> bytes:
        if s not in pngs:
            pngs[s] = subject_png(s)
        return pngs[s]

    # Pre-encode every text once in large batches (the encoder caches them).
    texts = {
        t
        for r in mixed
        for t in (r.src, r.rephrase, r.loc_q, *question_templates(r.src)[: cfg.n_text_positives])
    }
    texts |= {t for _, t in pool} | {t for _, t in unrelated}
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.text_cache:
        enc.load_cache(args.text_cache)
    enc.text_vectors(sorted(texts))
    if args.text_cache:
        enc.save_cache(args.text_cache)
    log.info("encoded %d texts in %.1fs", len(texts), time.perf_counter() - t0)
    sizes = [100] if args.quick else [100, 1000]
    if args.big:
        sizes.append(len(mixed))
    res = {
        "config": cfg.to_dict(),
        "encoder": enc.name,
        "mode": "text-side (subject-id images) + MiniLM",
        "streams": [],
        "pixels": [],
    }
    for n in sizes:
        n = min(n, len(mixed))
        cps = sorted({max(1, n // 10), n // 4, n // 2, n})
        res["streams"].append(
            run_stream(f"mixed E-VQA/VLKEB/E-IC x{n}", mixed[:n], enc, pool, unrelated, cfg, cps, png)
        )
    if not args.quick:
        vqa_only = [r for r in mixed if r.source == "E-VQA"][:400]
        res["streams"].append(
            run_stream("E-VQA only x400", vqa_only, enc, pool, unrelated, cfg, [100, 200, 400], png)
        )
    if not args.no_pixels:
        from esg_memory.encoders import ClipKeyEncoder

        res["pixels"].append(
            easy_vqa_stream(
                48, ClipKeyEncoder("esg-tiny-clip"), cfg, "easy-vqa pixels, tiny CLIP (random weights)"
            )
        )
        res["pixels"].append(
            easy_vqa_stream(
                48,
                PixelFeatureTextEncoder(enc.text),
                cfg,
                "easy-vqa pixels, MiniLM text + colour/silhouette pixel features",
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_routing.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (args.out / "bench_routing.md").write_text(md + "\n")
    plot(res, args.out / "bench_routing.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
