"""Train the scenes-world models (``esg-scenes-clip``, ``esg-scenes-llava``) on renderings drawn on the fly.

    nice -n 10 .venv/bin/python scripts/train_scenes_models.py            # both, into esg_memory/assets
    .venv/bin/python scripts/train_scenes_models.py --only clip --clip-steps 50 --out /tmp/assets

Data: `esg_memory.worlds.ScenesWorld` (docs/worlds.md), nothing downloaded. Training sees only
``train``-split subjects, ``train``-nuisance renderings (indices >= 1000, so no rendering an eval stream
uses) and ``train`` phrasings; the figures at the end are on what it never saw: ``test``-split subjects,
``held_out``-nuisance renderings and ``held_out`` phrasings. Seeded: the same seed, thread count and
library versions give the same files.

- Tokenizer: byte-level BPE on the train phrasings, answers, captions and a little general text (held-out
  phrasings are not in its corpus: they are split into whatever pieces the vocabulary has).
- CLIP (the easy-vqa CLIP's architecture, `train_default_models.clip_config`): image<->text multi-positive
  InfoNCE over full captions ("a small red striped circle left of a large blue solid star") and
  "question answer" facts, true or false of each picture by the world's own answers; image<->image SupCon
  over the subject (two renderings of each subject per batch: the nuisance factors are what it must
  ignore); question<->question SupCon over the family (paraphrases); linear probes of every object
  attribute and the count on the image embedding (dropped after).
- LLaVA (the easy-vqa LLaVA's architecture, vision tower initialised from this CLIP): the prompt
  template, loss on the answer only; each step 16 pictures x 4 questions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_default_models import (
    GENERAL_TEXT,
    MEAN,
    STD,
    _encode_prompts,
    _info,
    _publish,
    _warmup_cosine,
    build_llava,
    build_tokenizers,
    clip_config,
    clip_losses,
    common_arguments,
    llava_batch_loss,
    openclip_vision_to_hf,
    optimizer_step,
    save_llava,
    seed_all,
)

from esg_memory.pretrained import PROMPT_TEMPLATE, SCENES_CLIP, SCENES_LLAVA
from esg_memory.worlds import ScenesWorld
from esg_memory.worlds.render import COLOURS, PATTERNS, SHAPES, SIZES
from esg_memory.worlds.scenes import FAMILIES
from esg_memory.worlds.stream import TEXT_LOCALITY
from index import atomic_directory

log = logging.getLogger("train_scenes_models")
SCRIPT = "scripts/train_scenes_models.py"
DATA = "esg_memory.worlds.ScenesWorld (world v{w}, render v{r}): train subjects, renderings and phrasings"
#: Renderings at or above this index are the training ones (eval streams draw theirs below it).
FIRST_TRAIN_RENDERING = 1000
ATTRS = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": tuple(SIZES)}


class SceneData:
    """The world's subjects as arrays (attributes per object, -1 where absent) and its questions."""

    def __init__(self) -> None:
        self.world = ScenesWorld()
        subs = self.world.subjects
        self.split = np.array([self.world.subject_split(s) for s in subs])
        self.train_ids = np.flatnonzero(self.split == "train")
        self.test_ids = np.flatnonzero(self.split == "test")
        self.attr = np.full((len(subs), 2, 4), -1, dtype=np.int64)
        for s in subs:
            for j, ob in enumerate(s.objects):
                for a, (name, values) in enumerate(ATTRS.items()):
                    self.attr[s.id, j, a] = values.index(getattr(ob, name))
        self.count = np.array([len(s.objects) for s in subs])
        # every (family, phrasing) a model may train on, and the answer of each family on each subject
        self.families = {f.name: f for fs in FAMILIES.values() for f in fs}  # "count": one family, both
        self.fam_names = sorted(self.families)
        self.answer = {(s.id, f.name): s.answer(f) for s in subs for f in self.world.families(s)}
        self.fam_of = {s.id: [f.name for f in self.world.families(s)] for s in subs}

    def pixels(self, ids: list[int], split: str, index: list[int]) -> torch.Tensor:
        """(n, 3, 64, 64) float tensors normalised as both models' preprocessing does."""
        subs = self.world.subjects
        arr = np.stack([self.world.render(subs[i], split, k) for i, k in zip(ids, index, strict=True)])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]

    def caption(self, sid: int) -> str:
        def one(ob) -> str:
            return f"a {ob.size} {ob.colour} {ob.pattern} {ob.shape}"

        obs = self.world.subjects[sid].objects
        return one(obs[0]) if len(obs) == 1 else f"{one(obs[0])} left of {one(obs[1])}"

    def corpus(self) -> list[str]:
        lines = []
        for f in self.families.values():
            lines += list(f.train)
        answers = sorted(set(self.answer.values()) | {"three", "four"})
        lines += [PROMPT_TEMPLATE.format(question=q) + f" {a}</s>" for q in lines[:40] for a in answers]
        lines += [self.caption(int(i)) for i in self.train_ids[:3000]]
        lines += GENERAL_TEXT.splitlines() + list(TEXT_LOCALITY)
        return lines


def _same_picture_rows(ids: np.ndarray) -> np.ndarray:
    return ids[:, None] == ids[None, :]


def train_clip(args, data: SceneData, clip_tok, out: Path) -> dict:
    import open_clip

    t0 = time.time()
    cfg = clip_config(
        len(clip_tok), clip_tok.eos_token_id, clip_tok.pad_token_id, args.clip_patch, SCENES_CLIP
    )
    cfg["model_cfg"]["vision_cfg"]["layers"] = args.clip_layers
    tmp = Path(tempfile.mkdtemp(prefix="esg-clip-"))
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    clip_tok.save_pretrained(str(tmp))
    seed_all(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}", device="cpu")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    _check_preprocess(data, preprocess)
    questions = [(q, f) for f in data.fam_names for q in data.families[f].train]
    q_tokens = tokenizer([q for q, _ in questions])
    q_group = torch.tensor([data.fam_names.index(f) for _, f in questions])
    pad_id = clip_tok.pad_token_id
    rng = np.random.default_rng(args.seed)
    dim = cfg["model_cfg"]["embed_dim"]
    heads = torch.nn.ModuleDict(
        {f"{j}{a}": torch.nn.Linear(dim, len(v)) for j in range(2) for a, v in ATTRS.items()}
    )
    heads["count"] = torch.nn.Linear(dim, 2)
    params = list(model.parameters()) + (list(heads.parameters()) if args.clip_aux_weight > 0 else [])
    opt = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.05)
    steps, bs = args.clip_steps, args.clip_batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, 50))
    model.train()
    for step in range(steps):
        subj = rng.choice(data.train_ids, size=bs // 2, replace=False)
        ids = np.repeat(subj, 2)  # two renderings of each subject
        x = data.pixels(ids.tolist(), "train", rng.integers(FIRST_TRAIN_RENDERING, 10**6, size=bs).tolist())
        texts, truth = [], torch.zeros((bs, bs), dtype=torch.int8)
        for t, sid in enumerate(ids):
            if rng.random() < 0.5:
                texts.append(data.caption(int(sid)))
                truth[t] = torch.from_numpy(_same_picture_rows(ids)[t].astype(np.int8))
            else:
                f = data.fam_of[int(sid)][rng.integers(len(data.fam_of[int(sid)]))]
                fam = data.families[f]
                a = data.answer[(int(sid), f)]
                texts.append(f"{fam.train[rng.integers(len(fam.train))]} {a}")
                # true or false of every picture whose subject has the family; unknown (-1) elsewhere
                row = [
                    (int(data.answer[(int(j), f)] == a) if (int(j), f) in data.answer else -1) for j in ids
                ]
                truth[t] = torch.tensor(row, dtype=torch.int8)
        qi = torch.from_numpy(rng.integers(len(questions), size=args.clip_questions))
        img_raw, (loss, l_it, l_ii, l_qq) = clip_losses(
            model, x, tokenizer(texts), q_tokens[qi], truth, torch.from_numpy(ids), q_group[qi], pad_id,
            args.supcon_temp,
        )
        if args.clip_aux_weight > 0:
            att = torch.from_numpy(data.attr[ids])
            l_aux = sum(
                F.cross_entropy(heads[f"{j}{a}"](img_raw), att[:, j, k], ignore_index=-1)
                for j in range(2)
                for k, a in enumerate(ATTRS)
            ) + F.cross_entropy(heads["count"](img_raw), torch.from_numpy(data.count[ids] - 1))
            loss = loss + args.clip_aux_weight * l_aux
        optimizer_step(opt, sched, loss, model.parameters())
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "clip step %d/%d loss %.3f (it %.3f ii %.3f qq %.3f) %.1fs",
                step,
                steps,
                loss.item(),
                l_it.item(),
                l_ii.item(),
                l_qq.item(),
                time.time() - t0,
            )
    model.eval()
    train_s = time.time() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    with atomic_directory(out / SCENES_CLIP) as d:
        (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_file(state, str(d / "open_clip_model.safetensors"), metadata={"format": "pt"})
        clip_tok.save_pretrained(str(d))
        figures = clip_figures(d, data, args.eval_subjects)
        n_params = sum(p.numel() for p in model.parameters())
        info = _info(SCENES_CLIP, "open_clip", args, train_s, n_params, figures, _data_line(), SCRIPT)
        (d / "esg_pretrained.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    _publish(out / SCENES_CLIP)
    log.info("CLIP: %d params, trained in %.1fs, figures %s", n_params, train_s, figures)
    return info


def _data_line() -> str:
    from esg_memory.worlds import WORLD_VERSION
    from esg_memory.worlds.render import RENDER_VERSION

    return DATA.format(w=WORLD_VERSION, r=RENDER_VERSION)


def _check_preprocess(data: SceneData, preprocess) -> None:
    """The tensors built here must be what the model's own preprocessing makes of the PNG (64 -> 64)."""
    from PIL import Image

    s = data.world.subjects[int(data.train_ids[0])]
    ref = preprocess(Image.fromarray(data.world.render(s, "train", FIRST_TRAIN_RENDERING)))
    mine = data.pixels([s.id], "train", [FIRST_TRAIN_RENDERING])[0]
    if float((ref - mine).abs().max()) > 1e-5:
        raise RuntimeError("on-the-fly tensors differ from the model's preprocessing")


def clip_figures(d: Path, data: SceneData, n: int) -> dict:
    """Same-subject nearest neighbour across renderings, on ``n`` test-split subjects (never trained on):
    gallery one train-nuisance rendering per subject, queries one held-out-nuisance rendering each."""
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{d}", device="cpu")
    model.eval()
    ids = data.test_ids[:n].tolist()
    with torch.inference_mode():

        def emb(split: str, index: int) -> torch.Tensor:
            return torch.cat(
                [
                    model.encode_image(
                        data.pixels(ids[i : i + 256], split, [index] * len(ids[i : i + 256])), normalize=True
                    )
                    for i in range(0, len(ids), 256)
                ]
            )

        gal, q_held, q_train = emb("train", 0), emb("held_out", 0), emb("train", 1)
        top_held = (q_held @ gal.T).argmax(1).numpy()
        top_train = (q_train @ gal.T).argmax(1).numpy()
    ar = np.arange(len(ids))
    return {
        "nn_same_subject_held_out_renderings": float((top_held == ar).mean()),
        "nn_same_subject_train_renderings": float((top_train == ar).mean()),
        "n_subjects_in_gallery": len(ids),
    }


# --------------------------------------------------------------------------------------------- LLaVA
def train_llava(args, data: SceneData, tok, out: Path) -> dict:
    t0 = time.time()
    seed_all(args.seed)
    model, proc = build_llava(tok, args.llava_patch, args.llava_strategy)
    n_params = sum(p.numel() for p in model.parameters())
    clip_w = out / SCENES_CLIP / "open_clip_model.safetensors"
    from safetensors.torch import load_file

    model.model.vision_tower.load_state_dict(openclip_vision_to_hf(load_file(str(clip_w))), strict=True)
    log.info("LLaVA vision tower initialised from %s", clip_w)
    all_q = [q for f in data.families.values() for q in (*f.train, *f.held_out)]
    prompts = _encode_prompts(proc, all_q)
    answers = sorted(set(data.answer.values()))
    ans_ids = {a: tok(f" {a}</s>", add_special_tokens=False)["input_ids"] for a in answers}
    pad_id = tok.pad_token_id
    rng = np.random.default_rng(args.seed)
    vision = [p for n, p in model.named_parameters() if ".vision_tower." in f".{n}"]
    ids_v = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids_v]
    opt = torch.optim.AdamW(
        [
            {"params": rest, "lr": args.llava_lr},
            {"params": vision, "lr": args.llava_lr * args.vision_lr_scale},
        ],
        weight_decay=0.01,
    )
    steps, q_per = args.llava_steps, args.questions_per_image
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, 100))
    ipb = args.llava_batch // q_per
    model.train()
    for step in range(steps):
        subj = rng.choice(data.train_ids, size=ipb, replace=False)
        pix = data.pixels(
            subj.tolist(), "train", rng.integers(FIRST_TRAIN_RENDERING, 10**6, size=ipb).tolist()
        )
        seqs, labs, which = [], [], []
        for b, sid in enumerate(subj):
            fams = data.fam_of[int(sid)]
            for f in rng.choice(fams, size=min(q_per, len(fams)), replace=False):
                fam = data.families[str(f)]
                q = fam.train[rng.integers(len(fam.train))]
                p, a = prompts[q], ans_ids[data.answer[(int(sid), str(f))]]
                seqs.append(p + a)
                labs.append([-100] * len(p) + a)
                which.append(b)
        loss = llava_batch_loss(model, seqs, labs, which, pix, pad_id)
        optimizer_step(opt, sched, loss, model.parameters())
        if step % 100 == 0 or step == steps - 1:
            log.info("llava step %d/%d loss %.4f %.1fs", step, steps, loss.item(), time.time() - t0)
    model.eval()
    train_s = time.time() - t0
    with atomic_directory(out / SCENES_LLAVA) as d:
        save_llava(model, proc, d)
        figures = llava_figures(d, data, args.eval_subjects)
        info = _info(
            SCENES_LLAVA, "transformers-llava", args, train_s, n_params, figures, _data_line(), SCRIPT
        )
        info["prompt_template"] = PROMPT_TEMPLATE
        info["answer_format"] = " {answer}</s>"
        (d / "esg_pretrained.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    _publish(out / SCENES_LLAVA)
    log.info("LLaVA: %d params, trained in %.1fs, figures %s", n_params, train_s, figures)
    return info


def llava_figures(d: Path, data: SceneData, n: int) -> dict:
    """Greedy answers of the saved model on ``n`` test-split subjects x every family: held-out renderings
    with held-out phrasings (the target), train renderings with train phrasings, per question kind, and
    the question-only prior (the most common answer of each family over the training subjects)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(d))
    prior: dict[str, str] = {}
    for f in data.fam_names:
        votes = defaultdict(int)
        for sid in data.train_ids:
            if (int(sid), f) in data.answer:
                votes[data.answer[(int(sid), f)]] += 1
        prior[f] = max(sorted(votes), key=votes.__getitem__)
    subs = data.world.subjects
    out: dict[str, dict] = {}
    for name, r_split, p_split in (("held_out", "held_out", "held_out"), ("train", "train", "train")):
        rows = []
        for i, sid in enumerate(data.test_ids[:n].tolist()):
            for f in data.fam_of[sid]:
                ph = getattr(data.families[f], p_split)
                rows.append((sid, f, ph[i % len(ph)], i))
        hits: dict[str, list[int]] = defaultdict(list)
        prior_hits: dict[str, list[int]] = defaultdict(list)
        for b in range(0, len(rows), 128):
            chunk = rows[b : b + 128]
            ims = [Image.fromarray(data.world.render(subs[s], r_split, 0)) for s, *_ in chunk]
            enc = proc(
                text=[PROMPT_TEMPLATE.format(question=q) for _, _, q, _ in chunk],
                images=ims,
                return_tensors="pt",
                padding=True,
            )
            with torch.inference_mode():
                gen = model.generate(
                    **enc, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id
                )
            outs = proc.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for (s, f, _, _), o in zip(chunk, outs, strict=True):
                kind = data.families[f].kind
                truth = data.answer[(s, f)]
                hits[kind].append(int(o.strip() == truth))
                prior_hits[kind].append(int(prior[f] == truth))
        allh = [h for v in hits.values() for h in v]
        allp = [h for v in prior_hits.values() for h in v]
        out[name] = {
            "accuracy": float(np.mean(allh)),
            "by_kind": {k: float(np.mean(v)) for k, v in sorted(hits.items())},
            "question_only_prior": float(np.mean(allp)),
            "prior_by_kind": {k: float(np.mean(v)) for k, v in sorted(prior_hits.items())},
            "n_questions": len(allh),
        }
    return {"renderings_and_phrasings": out, "n_test_subjects": min(n, len(data.test_ids))}


def main(argv: list[str] | None = None) -> int:
    ap = common_arguments(__doc__.split("\n")[0], clip_steps=2400, llava_steps=4000)
    ap.add_argument("--clip-layers", type=int, default=3)
    ap.add_argument("--eval-subjects", type=int, default=700, help="test-split subjects scored at the end")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    data = SceneData()
    llava_tok, clip_tok = build_tokenizers(data.corpus(), args.vocab_size)
    log.info("world + tokenizer (%d tokens) in %.1fs", len(llava_tok), time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "clip"):
        train_clip(args, data, clip_tok, args.out)
    if args.only in (None, "llava"):
        train_llava(args, data, llava_tok, args.out)
    total = time.time() - t0
    log.info("train_scenes_models: done in %.1fs (%.1f min) with %d threads", total, total / 60, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
