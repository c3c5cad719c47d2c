"""Tuning a prefix adapter with the base model frozen, and the examples an edit's tuned adapter must answer.

`tune_prefix` starts from an edit's compiled (or previous tuned) adapter and optimises only the
adapter's own parameters — a low-rank soft-prompt delta or the K/V themselves — until every
example's greedy continuation is the edit's answer with `AdapterConfig.margin` to spare, on the
values rounded to the storage dtype (so what is verified is what gets stored). The wrapper runs it
for ``tune="sync"|"background"`` (`EditedModel.tune_edit`) and swaps the result in only if the edit
did not move on meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ..config import AdapterConfig, TunedKind
from ..errors import TuningError
from .adapters import STORAGE_TORCH_DTYPES, Adapter
from .families import Family, ModelSpec, PrefixKV, make_cache

__all__ = ["TuneReport", "TuningRuntime", "tune_prefix", "tuning_examples"]

logger = logging.getLogger("esg_memory.adapters")  # the name it had before the move into esg_memory.model

_DEFAULT_LR = {"kv": 0.3, "soft": 0.03}
_PROGRESS = 0.01  # logit margin a step must add to the best point to count as progress (`patience`)


@dataclass
class TuneReport:
    """Outcome of tuning one edit."""

    edit_id: int
    version: int
    kind: str
    exact: bool
    """Every example's greedy continuation equals the target (with ``margin``), on the stored values."""
    steps: int
    seconds: float
    loss: float
    min_margin: float
    n_examples: int


class TuningRuntime(Protocol):
    """What tuning needs of `esg_memory.model.runtime.AdapterRuntime` (declared here, so that the
    runtime can call into this module without an import cycle)."""

    model: Any
    processor: Any
    family: Family
    spec: ModelSpec
    config: AdapterConfig
    fingerprint: str

    def device_dtype(self) -> tuple[torch.device, torch.dtype]: ...

    def materialize(self, adapter: Adapter, params: dict[str, torch.Tensor] | None = None) -> PrefixKV: ...

    def resolve_kind(self, kind: str, length: int) -> Literal["soft", "kv"]: ...

    def soft_rank(self, length: int) -> int: ...


def tuning_examples(
    memory: Any, edit: Any, n_paraphrases: int = 4, n_augmented: int = 2, max_examples: int = 16,
    n_unrelated: int = 0,
) -> list[tuple[Any, str]]:
    """(image, prompt) rows an edit's tuned adapter must answer: the edit input, its stored positives
    (``None`` fields inherit the edit's image / question), question rewrites and image views like the
    ones the memory's scope admits, then ``n_unrelated`` unrelated questions about the edit's picture
    (answer-anywhere examples: see `EditedModelConfig.n_unrelated_questions`). Deduplicated, at most
    ``max_examples``."""
    from ..augment import augment_image, question_templates
    from ..scope import GENERIC_QUESTIONS

    img = memory.open_image(edit.image) if edit.image else None
    rows: list[tuple[Any, str]] = [(img, edit.question)]
    for pos in edit.positives:
        rows.append((memory.open_image(pos.image) if pos.image else img, pos.text or edit.question))
    rows += [(img, q) for q in question_templates(edit.question, n_paraphrases)]
    if img is not None and n_augmented:
        rows += [(a, edit.question) for a in augment_image(img, n_augmented, seed=int(edit.id))]
    rows += [(img, q) for q in GENERIC_QUESTIONS[:n_unrelated]]
    seen: set[tuple[int, str]] = set()
    out = []
    for im, q in rows:
        if (id(im), q) not in seen:
            seen.add((id(im), q))
            out.append((im, q))
    return out[:max_examples]


def tune_prefix(
    runtime: TuningRuntime,
    base: Adapter,
    examples: Sequence[tuple[Any, str]],
    answer: str,
    kind: TunedKind | None = None,
) -> tuple[Adapter, TuneReport]:
    """Optimise a prefix (base frozen) so every ``(image, prompt)`` example greedily yields ``answer``.

    Only the adapter's parameters receive gradients (``torch.autograd.grad`` on them alone: no base
    parameter ``.grad`` is ever written and no weight is modified).
    """
    cfg = runtime.config
    kind = runtime.resolve_kind(kind or cfg.tuned_kind, base.length)
    if not examples:
        raise TuningError("no examples to tune on")
    examples = list(examples)[: cfg.max_examples]
    device = runtime.device_dtype()[0]
    sdtype = STORAGE_TORCH_DTYPES[cfg.storage_dtype]
    params = _init_params(runtime, base, kind, device)
    shell = Adapter(kind, base.edit_id, base.version, runtime.fingerprint, base.token_ids)
    embeds, mask, positions, target = _tuning_batch(runtime, examples, answer, device, base.length)
    n_t, bsz = target.numel(), embeds.shape[0]
    tgt = target.expand(bsz, -1)
    lr = cfg.lr if cfg.lr is not None else _DEFAULT_LR[kind]
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    t0 = time.perf_counter()
    loss_v, margin_v, exact, step, since = float("nan"), float("-inf"), False, 0, 0
    # the best point kept if the budget runs out: first the edit's own input (row 0) clearing the margin,
    # then the smallest margin over every example (an edit must at least answer its own input)
    best: tuple[tuple[float, float], dict[str, torch.Tensor]] = ((float("-inf"), float("-inf")), {})
    with torch.enable_grad():
        for step in range(1, cfg.max_steps + 1):
            rounded = {k: _round_st(p, sdtype) for k, p in params.items()}
            kv = runtime.materialize(shell, rounded)
            cache = make_cache(
                runtime.model, [(k.expand(bsz, -1, -1, -1), v.expand(bsz, -1, -1, -1)) for k, v in kv]
            )
            # only the positions that predict the target need logits: the LM head runs on n_t + 1 rows
            out = runtime.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                logits_to_keep=n_t + 1,
            )
            logits = out.logits[:, :n_t].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)
            )
            if not torch.isfinite(loss):
                raise TuningError(f"non-finite loss at step {step}")
            with torch.no_grad():
                gold = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                other = logits.scatter(-1, tgt.unsqueeze(-1), float("-inf")).amax(-1)
                rows = (gold - other).amin(-1)
                margin_v = float(rows.min())
                key = (min(float(rows[0]), cfg.margin), margin_v)
            loss_v = float(loss.detach())
            if key > best[0]:  # keep the best verified values in case the budget runs out
                if key[0] > best[0][0] or key[1] > best[0][1] + _PROGRESS:
                    since = 0
                best = (key, {k: p.detach().clone() for k, p in params.items()})
            if margin_v >= cfg.margin:
                exact = True
                break
            since += 1
            if cfg.patience is not None and since >= cfg.patience:
                logger.debug("edit %d v%d: no progress in %d steps, stopping at step %d",
                             base.edit_id, base.version, since, step)
                break
            grads = torch.autograd.grad(loss, list(params.values()))
            for p, g in zip(params.values(), grads, strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
    margin_v = best[0][1]
    params = best[1]
    stored = {k: p.detach().to(sdtype).cpu() for k, p in params.items()}
    tuned = Adapter(kind, base.edit_id, base.version, runtime.fingerprint, base.token_ids, stored, exact)
    report = TuneReport(base.edit_id, base.version, kind, exact, step, time.perf_counter() - t0, loss_v,
                        margin_v, len(examples))
    logger.info("tuned edit %d v%d (%s): exact=%s steps=%d margin=%.3f in %.2fs", base.edit_id,
                base.version, kind, exact, step, margin_v, report.seconds)
    return tuned, report


def _round_st(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Forward sees ``t`` rounded to the storage dtype; gradient passes straight through."""
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def _init_params(
    runtime: TuningRuntime, base: Adapter, kind: str, device: torch.device
) -> dict[str, torch.nn.Parameter]:
    # float32 master copies whatever the model dtype: Adam on fp16/bf16 values stalls or overflows;
    # the forward casts to the model dtype (``materialize``) after rounding to the storage dtype
    if kind == "kv":
        with torch.no_grad():
            kv = runtime.materialize(base)
        out = {}
        for i, (k, v) in enumerate(kv):
            out[f"k.{i}"] = torch.nn.Parameter(k.detach().float().clone())
            out[f"v.{i}"] = torch.nn.Parameter(v.detach().float().clone())
        return out
    if kind != "soft":
        raise TuningError(f"cannot tune kind {kind!r}")
    if base.kind == "soft":
        return {k: torch.nn.Parameter(t.to(device, torch.float32)) for k, t in base.tensors.items()}
    p_len, hid = base.length, runtime.spec.hidden_size
    r = runtime.soft_rank(p_len)
    gen = torch.Generator().manual_seed(runtime.config.seed)
    scale = float(runtime.model.get_input_embeddings().weight.detach().float().std())
    v = torch.randn(hid, r, generator=gen) * scale
    return {
        "u": torch.nn.Parameter(torch.zeros(p_len, r, device=device)),
        "v": torch.nn.Parameter(v.to(device)),
    }


def _tuning_batch(
    runtime: TuningRuntime,
    examples: Sequence[tuple[Any, str]],
    answer: str,
    device: torch.device,
    prefix_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced batch (prompt + target) as merged input embeddings, mask and positions.

    Image features do not depend on the prefix, so the vision tower runs once here instead of at
    every step: the language model's input embeddings (``hidden_states[0]``, images merged) are
    taken from one no-grad forward with explicit positions (which also leaves Qwen's
    ``rope_deltas`` state untouched).
    """
    images = [im for im, _ in examples]
    prompts = [q for _, q in examples]
    enc = runtime.family.build_inputs(runtime.processor, images, prompts)
    ref_prompt = runtime.family.format_prompt(runtime.processor, prompts[0], images[0] is not None)
    target = runtime.family.target_ids(runtime.processor, answer, ref_prompt)
    target = torch.tensor(target, dtype=torch.long, device=device)
    _, dtype = runtime.device_dtype()
    batch = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in enc.items()
    }
    bsz = batch["input_ids"].shape[0]
    tail = target.unsqueeze(0).expand(bsz, -1)
    batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
    if "mm_token_type_ids" in batch:
        mm = batch["mm_token_type_ids"]
        batch["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tail, dtype=mm.dtype)], dim=1)
    mask = batch["attention_mask"]
    plain_pos = runtime.family.positions(runtime.model, batch, mask, mask, [0] * bsz)
    with torch.no_grad():
        embeds = runtime.model(**batch, position_ids=plain_pos, output_hidden_states=True).hidden_states[0]
    full_mask, positions = runtime.family.prefix_layout(runtime.model, batch, [prefix_len] * bsz)
    return embeds.detach(), full_mask, positions, target
