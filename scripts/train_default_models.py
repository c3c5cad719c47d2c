"""Train the embedded default models (``esg-easyvqa-clip``, ``esg-easyvqa-llava``) on easy-vqa.

    nice -n 10 .venv/bin/python scripts/train_default_models.py            # both, into esg_memory/assets
    .venv/bin/python scripts/train_default_models.py --only clip --out /tmp/assets

Data: PyPI ``easy-vqa`` 1.0 (MIT), train split only (4000 pictures, 38,575 questions); the test
split is touched only for the figures printed at the end. Seeded: the same seed, thread count and
library versions give the same files. Prints how long each part took.

- Tokenizer: byte-level BPE (``tokenizers``) on easy-vqa's questions/answers, captions, the
  prompt template and a little general text; specials ``<unk> <s> </s> <pad> <image>``.
- CLIP (open_clip architecture): ViT 128 wide x 3 on 64x64 (patch 16) + a 2-layer text
  transformer over the same BPE (49k-row CLIP BPE embeddings alone would be ~6 MB in fp16).
  Losses: image<->text InfoNCE where every text true of a picture is a positive (captions such as
  "a red circle", and "question answer" facts), image<->image SupCon over (shape, colour),
  question<->question SupCon grouping paraphrases (questions with the same answer on every subject),
  and linear shape/colour probes on the image embedding (``--clip-aux-weight``; dropped after).
- LLaVA (transformers): CLIP vision 128 x 3 on 64x64 patch 16 (initialised from the CLIP above, as
  LLaVA starts from a trained CLIP; ``vision_feature_select_strategy="full"`` keeps the CLS token,
  where that tower pools the shape), Llama 128 x 3, trained on
  ``"USER: <image>\\n{q} ASSISTANT:" -> " {a}</s>"``; loss on the answer only. Each step encodes 16
  pictures once and asks 4 of each one's questions (64 rows).

Patch 16 rather than 8 and one thread: measured here on 2 shared, oversubscribed cores, a patch-8
ViT step cost ~6.6x a patch-16 one, and 2 OpenMP threads ran ~3x slower than 1 (threads wait on
each other when the cores are busy). Patch 8 would also give the LLaVA 64 image tokens instead of 16.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
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

from esg_memory.pretrained import (
    EASYVQA_CLIP,
    EASYVQA_COLOURS,
    EASYVQA_LLAVA,
    EASYVQA_SHAPES,
    PROMPT_TEMPLATE,
    derive_subjects,
)
from index import atomic_directory

log = logging.getLogger("train_default_models")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLASSES = [(s, c) for s in EASYVQA_SHAPES for c in EASYVQA_COLOURS]
CAPTIONS = ("a {c} {s}", "a picture of a {c} {s}", "{c} {s}", "a {c} {s} in the image", "the {s} is {c}")
# A little general English so the tokenizer does not split every non-easy-vqa word into bytes.
GENERAL_TEXT = """The quick brown fox jumps over the lazy dog. This is a photo of a cat sitting on a chair.
What is in the picture? The answer is yes. The answer is no. Who painted this painting? Where was this
photo taken? How many objects are there? There are two dogs and one bird in the park. The capital of
France is Paris. The sky is blue and the grass is green. A person is riding a bicycle in the city.
Describe the image. What colour is the car? It is a red car next to a white house. Is this a square, a
star or a circle? The shape in the middle is purple, orange or pink. Thank you, that is correct."""
# Chat template rendering exactly PROMPT_TEMPLATE (and esg_memory.model.families' LLaVA plain template).
# Newlines as {{ '\\n' }}: transformers renders with trim_blocks, which eats a literal one after a tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ '\\n' }}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{{ '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% else %} ASSISTANT: {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
MEAN = STD = (0.5, 0.5, 0.5)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data
class Split:
    """One easy-vqa split: questions, answers, image ids, pictures and each picture's subject."""

    def __init__(self, name: str) -> None:
        import easy_vqa
        from PIL import Image

        get_q = easy_vqa.get_train_questions if name == "train" else easy_vqa.get_test_questions
        get_p = easy_vqa.get_train_image_paths if name == "train" else easy_vqa.get_test_image_paths
        self.questions, self.answers, ids = get_q()
        paths = get_p()
        self.ids = sorted(paths)
        self.row = {i: r for r, i in enumerate(self.ids)}
        self.q_img = np.array([self.row[i] for i in ids])
        self.images = [Image.open(paths[i]).convert("RGB") for i in self.ids]
        subj = derive_subjects(self.questions, self.answers, ids)
        cls = {c: k for k, c in enumerate(CLASSES)}
        # -1: shape or colour not determined by the picture's questions
        self.label = np.array([cls.get(subj.get(i, (None, None)), -1) for i in self.ids])
        # shape and colour on their own (known for more pictures than the pair)
        self.shape = np.array([_index(EASYVQA_SHAPES, subj.get(i, (None, None))[0]) for i in self.ids])
        self.colour = np.array([_index(EASYVQA_COLOURS, subj.get(i, (None, None))[1]) for i in self.ids])
        self.by_img: dict[int, list[int]] = defaultdict(list)
        for k, r in enumerate(self.q_img):
            self.by_img[int(r)].append(k)


def _index(options: tuple[str, ...], value: str | None) -> int:
    return options.index(value) if value in options else -1


def tokenizer_corpus(train: Split) -> list[str]:
    lines = sorted(set(train.questions))
    pairs = list(zip(train.questions, train.answers, strict=True))[:5000]
    lines += [PROMPT_TEMPLATE.format(question=q) + f" {a}</s>" for q, a in pairs]
    lines += [t.format(s=s, c=c) for s, c in CLASSES for t in CAPTIONS]
    lines += GENERAL_TEXT.splitlines()
    return lines


def build_tokenizers(corpus: list[str], vocab_size: int):
    """(LLaVA tokenizer: ``<s> $A``, CLIP tokenizer: lowercased, ``<s> $A </s>``), one vocabulary
    learnt from the ``corpus`` lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    kw = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    llava_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, extra_special_tokens={"image_token": "<image>"}, padding_side="left", **kw
    )
    clip = Tokenizer.from_str(tok.to_str())
    # keys should not care about case; the LLaVA keeps case so edited answers keep theirs
    clip.normalizer = normalizers.Lowercase()
    clip.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    clip_tok = PreTrainedTokenizerFast(tokenizer_object=clip, padding_side="right", **kw)
    return llava_tok, clip_tok


# ---------------------------------------------------------------------------------------------- CLIP
def clip_config(vocab_size: int, eos_id: int, pad_id: int, patch: int, name: str = EASYVQA_CLIP) -> dict:
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {
                "image_size": 64, "patch_size": patch, "width": 128, "layers": 3, "head_width": 32
            },
            "text_cfg": {
                "context_length": 32,
                "vocab_size": vocab_size,
                # any non-empty value: under 'local-dir:' open_clip loads the tokenizer from that dir
                "hf_tokenizer_name": name,
                "width": 128,
                "heads": 4,
                "layers": 2,
                "pool_type": "eos",
                "eos_id": eos_id,
                "pad_id": pad_id,
            },
        },
        "preprocess_cfg": {
            "size": [64, 64],
            "mode": "RGB",
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def answer_table(split: Split) -> dict[tuple[str, int], str]:
    """(question, subject class) -> answer from the training data (answers are subject-determined)."""
    t: dict[tuple[str, int], str] = {}
    for q, a, r in zip(split.questions, split.answers, split.q_img, strict=True):
        lab = int(split.label[r])
        if lab >= 0:
            t[(q, lab)] = a
    return t


def multi_positive_nce(logits: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform target over each row's positives; pairs of unknown truth masked."""
    logits = logits.masked_fill(~valid, -1e4)
    logp = logits.log_softmax(dim=1)
    target = pos.float() / pos.float().sum(1, keepdim=True).clamp_min(1)
    return -(target * logp).sum(1).mean()


def train_clip(args, train: Split, test: Split, clip_tok, out: Path) -> dict:
    import open_clip

    t0 = time.time()
    cfg = clip_config(len(clip_tok), clip_tok.eos_token_id, clip_tok.pad_token_id, args.clip_patch)
    tmp = Path(tempfile.mkdtemp(prefix="esg-clip-"))
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    clip_tok.save_pretrained(str(tmp))
    seed_all(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}", device="cpu")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    x_train = torch.stack([preprocess(im) for im in train.images])
    table = answer_table(train)
    questions = sorted(set(train.questions))
    # paraphrase groups: questions whose answers agree on every subject they were asked about
    sig = {q: tuple(table.get((q, k), "") for k in range(len(CLASSES))) for q in questions}
    group = {s: g for g, s in enumerate(sorted(set(sig.values())))}
    q_group = torch.tensor([group[sig[q]] for q in questions])
    q_tokens = tokenizer(questions)
    pad_id = clip_tok.pad_token_id
    rng = np.random.default_rng(args.seed)
    # auxiliary linear probes for shape and colour on the image embedding: a direct signal for the
    # shape, which the contrastive terms alone teach slowly; dropped after training
    dim = cfg["model_cfg"]["embed_dim"]
    heads = torch.nn.ModuleDict(
        {
            "shape": torch.nn.Linear(dim, len(EASYVQA_SHAPES)),
            "colour": torch.nn.Linear(dim, len(EASYVQA_COLOURS)),
        }
    )
    params = list(model.parameters()) + (list(heads.parameters()) if args.clip_aux_weight > 0 else [])
    opt = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.05)
    n_img, bs = len(train.ids), args.clip_batch
    steps = args.clip_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, 50))
    labels = torch.from_numpy(train.label)
    with torch.no_grad():  # the trimmed path must equal open_clip's own
        ref = model.encode_text(q_tokens, normalize=True)
        diff = (_encode_text(model, _trim(q_tokens, pad_id)) - ref).abs()
    if float(diff.max()) > 1e-4:
        raise RuntimeError(f"trimmed text encoding differs from open_clip's by {float(diff.max()):.2e}")
    model.train()
    order: list[int] = []
    for step in range(steps):
        if len(order) < bs:
            order += rng.permutation(n_img).tolist()
        rows, order = order[:bs], order[bs:]
        rows_t = torch.tensor(rows)
        lab = labels[rows_t]
        texts, t_kind = [], []  # t_kind: ("cap", class) or ("qa", question, answer)
        for r in rows:
            if train.label[r] >= 0 and rng.random() < 0.5:
                s, c = CLASSES[train.label[r]]
                texts.append(CAPTIONS[rng.integers(len(CAPTIONS))].format(s=s, c=c))
                t_kind.append(("cap", int(train.label[r])))
            else:
                k = int(rng.choice(train.by_img[r]))
                texts.append(f"{train.questions[k]} {train.answers[k]}")
                t_kind.append(("qa", train.questions[k], train.answers[k]))
        # truth[t, j]: is text t true of picture j (1), false (0) or unknown (-1)
        truth = torch.full((bs, bs), -1, dtype=torch.int8)
        for t, kind in enumerate(t_kind):
            for j in range(bs):
                lj = int(lab[j])
                if j == t:
                    truth[t, j] = 1
                elif lj < 0:
                    continue
                elif kind[0] == "cap":
                    truth[t, j] = int(kind[1] == lj)
                else:
                    ans = table.get((kind[1], lj))
                    if ans is not None:
                        truth[t, j] = int(ans == kind[2])
        x = x_train[rows_t]
        flip = torch.from_numpy(rng.random(bs) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        qi = torch.from_numpy(rng.integers(len(questions), size=args.clip_questions))
        img_raw, (loss, l_it, l_ii, l_qq) = clip_losses(
            model, x, tokenizer(texts), q_tokens[qi], truth, lab, q_group[qi], pad_id, args.supcon_temp
        )
        if args.clip_aux_weight > 0:
            l_aux = sum(
                F.cross_entropy(heads[k](img_raw), torch.from_numpy(getattr(train, k)[rows]), ignore_index=-1)
                for k in ("shape", "colour")
            )
            loss = loss + args.clip_aux_weight * l_aux
        optimizer_step(opt, sched, loss, model.parameters())
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "clip step %d/%d loss %.3f (it %.3f ii %.3f qq %.3f) %.1fs",
                step, steps, loss.item(), l_it.item(), l_ii.item(), l_qq.item(), time.time() - t0,
            )
    model.eval()
    train_s = time.time() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = EASYVQA_CLIP
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    with atomic_directory(out / EASYVQA_CLIP) as d:
        (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_file(state, str(d / "open_clip_model.safetensors"), metadata={"format": "pt"})
        clip_tok.save_pretrained(str(d))
        top1 = clip_retrieval_top1(d, train, test)
        n_params = sum(p.numel() for p in model.parameters())
        info = _info(EASYVQA_CLIP, "open_clip", args, train_s, n_params, {"retrieval_top1_test": top1})
        info["n_test_pictures_scored"] = int((test.label >= 0).sum())
        (d / "esg_pretrained.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    _publish(out / EASYVQA_CLIP)
    log.info("CLIP: %d params, trained in %.1fs, held-out retrieval top-1 %.4f", n_params, train_s, top1)
    return info


def clip_losses(model, x, text_tokens, q_tokens, truth, img_label, q_label, pad_id: int, temp: float):
    """``(raw image embeddings, (total, image<->text, image<->image, question<->question))`` of one CLIP
    batch: multi-positive InfoNCE against ``truth`` (1 true, 0 false, -1 unknown; texts x pictures),
    SupCon of the pictures over ``img_label`` and of the questions over ``q_label``."""
    img_raw = model.encode_image(x)
    img = F.normalize(img_raw, dim=-1)
    txt = _encode_text(model, _trim(text_tokens, pad_id))
    qtx = _encode_text(model, _trim(q_tokens, pad_id))
    logits = model.logit_scale.exp().clamp(max=100) * txt @ img.T
    pos, valid = truth == 1, truth >= 0
    l_it = 0.5 * (multi_positive_nce(logits, pos, valid) + multi_positive_nce(logits.T, pos.T, valid.T))
    l_ii = _supcon(img, img_label, temp)
    l_qq = _supcon(qtx, q_label, temp)
    return img_raw, (l_it + l_ii + 0.5 * l_qq, l_it, l_ii, l_qq)


def clip_retrieval_top1(d: Path, train: Split, test: Split) -> float:
    """Is each labelled test picture's nearest training picture of the same (shape, colour)? (fp16)"""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}", device="cpu")
    model.eval()
    with torch.inference_mode():
        def emb(ims):
            return torch.cat([
                model.encode_image(torch.stack([preprocess(im) for im in ims[i : i + 256]]), normalize=True)
                for i in range(0, len(ims), 256)
            ])

        gal_mask, q_mask = train.label >= 0, test.label >= 0
        gal = emb([im for im, m in zip(train.images, gal_mask, strict=True) if m])
        qry = emb([im for im, m in zip(test.images, q_mask, strict=True) if m])
        nn_idx = (qry @ gal.T).argmax(1).numpy()
    return float((train.label[gal_mask][nn_idx] == test.label[q_mask]).mean())


def _trim(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop all-padding trailing columns: exact, since the causal mask hides them from the pooled eos."""
    used = (tokens != pad_id).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens


def _encode_text(model, text: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(normalize=True)`` on a trimmed batch (open_clip's CLIP wants full context)."""
    from open_clip.transformer import text_global_pool

    n = text.shape[1]
    x = model.token_embedding(text) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=model.text_eos_id)
    proj = model.text_projection
    x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1)


def _supcon(z: torch.Tensor, lab: torch.Tensor, temp: float) -> torch.Tensor:
    """Supervised contrastive loss; rows with an unknown label (-1) or no positive are skipped."""
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    known = lab >= 0
    pos = (lab[:, None] == lab[None, :]) & known[:, None] & known[None, :] & ~eye
    valid = known[:, None] & known[None, :] & ~eye
    logits = (z @ z.T / temp).masked_fill(~valid, -1e4)
    logp = logits.log_softmax(1)
    has = pos.any(1)
    if not has.any():
        return z.sum() * 0
    per = -(logp * pos).sum(1) / pos.sum(1).clamp_min(1)
    return per[has].mean()


def _warmup_cosine(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


# --------------------------------------------------------------------------------------------- LLaVA
def build_llava(tok, patch: int, strategy: str):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        image_size=64, patch_size=patch, projection_dim=128, hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy=strategy,
        image_seq_length=(64 // patch) ** 2 + (strategy == "full"),
    )
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=list(MEAN),
        image_std=list(STD),
    )
    proc = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, proc


def openclip_vision_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ``visual.*`` ViT weights -> transformers ``CLIPVisionModel`` keys (exact: max diff ~1e-7)."""
    g = {k[len("visual.") :]: v.float() for k, v in sd.items() if k.startswith("visual.")}
    out = {
        "embeddings.class_embedding": g["class_embedding"],
        "embeddings.patch_embedding.weight": g["conv1.weight"],
        "embeddings.position_embedding.weight": g["positional_embedding"],
        "pre_layrnorm.weight": g["ln_pre.weight"],
        "pre_layrnorm.bias": g["ln_pre.bias"],
        "post_layernorm.weight": g["ln_post.weight"],
        "post_layernorm.bias": g["ln_post.bias"],
    }
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in g:
        b, h = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        w, bias = g[b + "attn.in_proj_weight"], g[b + "attn.in_proj_bias"]
        d = w.shape[0] // 3
        for j, n in enumerate("qkv"):
            out[h + f"self_attn.{n}_proj.weight"] = w[j * d : (j + 1) * d]
            out[h + f"self_attn.{n}_proj.bias"] = bias[j * d : (j + 1) * d]
        for a, c in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[h + c + ".weight"], out[h + c + ".bias"] = g[b + a + ".weight"], g[b + a + ".bias"]
        i += 1
    return out


def _encode_prompts(proc, questions: list[str]) -> dict[str, list[int]]:
    """Token ids of each distinct prompt, image tokens expanded exactly as the processor does."""
    from PIL import Image

    blank = Image.new("RGB", (64, 64), "white")
    out = {}
    for q in sorted(set(questions)):
        enc = proc(text=[PROMPT_TEMPLATE.format(question=q)], images=[blank], return_tensors="pt")
        out[q] = enc["input_ids"][0].tolist()
    return out


def train_llava(args, train: Split, test: Split, tok, out: Path) -> dict:
    t0 = time.time()
    seed_all(args.seed)
    model, proc = build_llava(tok, args.llava_patch, args.llava_strategy)
    n_params = sum(p.numel() for p in model.parameters())
    clip_w = out / EASYVQA_CLIP / "open_clip_model.safetensors"
    if args.init_vision_from_clip:
        # like LLaVA itself: start from a CLIP vision tower that already tells shapes and colours apart
        from safetensors.torch import load_file

        model.model.vision_tower.load_state_dict(openclip_vision_to_hf(load_file(str(clip_w))), strict=True)
        log.info("LLaVA vision tower initialised from %s", clip_w)
    pix_train = proc.image_processor(images=train.images, return_tensors="pt")["pixel_values"]
    prompts = _encode_prompts(proc, train.questions + test.questions)
    ans_ids = {a: tok(f" {a}</s>", add_special_tokens=False)["input_ids"] for a in set(train.answers)}
    pad_id = tok.pad_token_id
    rng = np.random.default_rng(args.seed)
    vision = [p for n, p in model.named_parameters() if ".vision_tower." in f".{n}"]
    ids_v = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids_v]
    # a gentler rate for the CLIP-initialised tower, so the random projector cannot wash it out early
    v_lr = args.llava_lr * (args.vision_lr_scale if args.init_vision_from_clip else 1.0)
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": args.llava_lr}, {"params": vision, "lr": v_lr}], weight_decay=0.01
    )
    steps, n_img, q_per = args.llava_steps, len(train.ids), args.questions_per_image
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, 100))
    ipb = args.llava_batch // q_per
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < ipb:
            order += rng.permutation(n_img).tolist()
        imgs, order = order[:ipb], order[ipb:]
        seqs, labs, which = [], [], []
        for b, r in enumerate(imgs):
            ks = train.by_img[r]
            for k in rng.choice(ks, size=min(q_per, len(ks)), replace=False):
                p, a = prompts[train.questions[k]], ans_ids[train.answers[k]]
                seqs.append(p + a)
                labs.append([-100] * len(p) + a)
                which.append(b)
        loss = llava_batch_loss(model, seqs, labs, which, pix_train[torch.tensor(imgs)], pad_id)
        optimizer_step(opt, sched, loss, model.parameters())
        if step % 100 == 0 or step == steps - 1:
            log.info("llava step %d/%d loss %.4f %.1fs", step, steps, loss.item(), time.time() - t0)
    model.eval()
    train_s = time.time() - t0
    with atomic_directory(out / EASYVQA_LLAVA) as d:
        save_llava(model, proc, d)
        acc, n_eval = llava_accuracy(d, test, args.eval_limit)
        info = _info(EASYVQA_LLAVA, "transformers-llava", args, train_s, n_params, {"test_accuracy": acc})
        info["n_test_questions_scored"] = n_eval
        info["prompt_template"] = PROMPT_TEMPLATE
        info["answer_format"] = " {answer}</s>"
        (d / "esg_pretrained.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    _publish(out / EASYVQA_LLAVA)
    log.info("LLaVA: %d params, trained in %.1fs, test accuracy %.4f on %d", n_params, train_s, acc, n_eval)
    return info


def optimizer_step(opt, sched, loss: torch.Tensor, params) -> None:
    """One optimiser step, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def llava_batch_loss(model, seqs: list, labs: list, which: list, pixel_values: torch.Tensor, pad_id: int):
    """Answer-only loss of one batch of prompt + answer sequences; each picture goes through the vision
    tower once and its features are shared by its questions (``which``: each row's picture)."""
    L = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (L - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (L - len(s)) for s in labs])
    am = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    feats = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=-1,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    feats = feats[torch.tensor(which)]
    x = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_index).unsqueeze(-1)
    x = x.masked_scatter(mask, feats.reshape(-1, feats.shape[-1]).to(x.dtype))
    return model(inputs_embeds=x, attention_mask=am, labels=labels).loss


def save_llava(model, proc, d: Path) -> None:
    """The model (fp16 weights) and its processor into ``d``; the config says float32: CPUs run fp16
    slowly and less exactly, so loaders get float32 by default."""
    model.to(torch.float16).save_pretrained(str(d))
    cfg_file = d / "config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    for c in (cfg, cfg.get("text_config", {}), cfg.get("vision_config", {})):
        if "dtype" in c:
            c["dtype"] = "float32"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    proc.save_pretrained(str(d))


def llava_accuracy(d: Path, test: Split, limit: int) -> tuple[float, int]:
    """Greedy answers of the saved (fp16 -> float32) model on the first ``limit`` test questions."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(d))
    n = min(limit, len(test.questions)) if limit > 0 else len(test.questions)
    correct = 0
    for i in range(0, n, 128):
        ks = range(i, min(n, i + 128))
        enc = proc(
            text=[PROMPT_TEMPLATE.format(question=test.questions[k]) for k in ks],
            images=[test.images[test.q_img[k]] for k in ks], return_tensors="pt", padding=True,
        )
        with torch.inference_mode():
            gen = model.generate(
                **enc, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id
            )
        outs = proc.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(o.strip() == test.answers[k] for o, k in zip(outs, ks, strict=True))
    return correct / n, n


def _publish(d: Path) -> None:
    """Ordinary permissions (the atomic temp dir is private) so the files install like any package data."""
    d.chmod(0o755)
    for f in d.iterdir():
        f.chmod(0o644)


_DATA = "easy-vqa 1.0 (PyPI, MIT): train split; figures on the test split"


def _info(
    name: str, kind: str, args, train_s: float, n_params: int, figures: dict, data: str = _DATA,
    script: str = "scripts/train_default_models.py",
) -> dict:
    import transformers

    return {
        "format_version": 1,
        "name": name,
        "kind": kind,
        "data": data,
        "script": script,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(train_s, 1),
        "n_params": n_params,
        "figures": figures,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }


def common_arguments(description: str, clip_steps: int, llava_steps: int) -> argparse.ArgumentParser:
    """The options both training scripts share (architecture, optimisation, output)."""
    ap = argparse.ArgumentParser(description=description)
    assets = Path(__file__).resolve().parent.parent / "esg_memory" / "assets"
    ap.add_argument("--out", type=Path, default=assets)
    ap.add_argument("--only", choices=["clip", "llava"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    # 1 thread: on 2 shared, oversubscribed cores, 2 OpenMP threads ran a ViT step ~3x slower than 1
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clip-patch", type=int, default=16)
    ap.add_argument("--llava-patch", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--clip-steps", type=int, default=clip_steps)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=1.5e-3)
    ap.add_argument("--clip-questions", type=int, default=64, help="questions per step for paraphrase SupCon")
    ap.add_argument("--clip-aux-weight", type=float, default=1.0)
    ap.add_argument("--supcon-temp", type=float, default=0.1)
    ap.add_argument("--llava-steps", type=int, default=llava_steps)
    ap.add_argument("--llava-batch", type=int, default=64)
    ap.add_argument("--llava-lr", type=float, default=2e-3)
    # "full" keeps the CLS token, where the CLIP-trained tower pools what it knows about the shape
    ap.add_argument("--llava-strategy", choices=["default", "full"], default="full")
    ap.add_argument("--vision-lr-scale", type=float, default=0.25)
    ap.add_argument("--questions-per-image", type=int, default=4)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = common_arguments(__doc__.split("\n")[0], clip_steps=800, llava_steps=1000)
    ap.add_argument("--no-init-vision-from-clip", dest="init_vision_from_clip", action="store_false")
    ap.add_argument("--eval-limit", type=int, default=2000, help="test questions scored at the end (0: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train, test = Split("train"), Split("test")
    llava_tok, clip_tok = build_tokenizers(tokenizer_corpus(train), args.vocab_size)
    log.info("data + tokenizer (%d tokens) in %.1fs", len(llava_tok), time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "clip"):
        train_clip(args, train, test, clip_tok, args.out)
    if args.only in (None, "llava"):
        train_llava(args, train, test, llava_tok, args.out)
    total = time.time() - t0
    print(f"train_default_models: done in {total:.1f}s ({total / 60:.1f} min) with {args.threads} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
