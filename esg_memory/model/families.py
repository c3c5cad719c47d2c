"""Per-architecture facts and the mechanics of injecting a per-row KV prefix into a frozen MLLM.

A *family* is keyed by transformers' ``config.model_type`` and knows: where the language model is, its
shape (layers, KV heads, head dim, hidden size), whether RoPE is 1-D or Qwen2-VL's 3-D mRoPE, how an
``(image, prompt)`` pair becomes model inputs, and how a batch of per-row prefixes becomes the
``cache`` / ``attention_mask`` / ``position_ids`` triple that makes the prefix behave exactly like
prepended tokens (verified facts, transformers 5.24):

* a fresh ``DynamicCache`` per call, because ``forward``/``generate`` append to a cache in place;
* the attention mask covers prefix + input (P + L); with a mask of length L ``generate`` would assume
  the cache already holds the first P *input* tokens and drop them;
* positions continue after each row's prefix: 1-D families use the mask cumsum, mRoPE families need
  explicit ``get_rope_index(...)[0] + P`` (otherwise a stale ``rope_deltas`` is silently wrong);
* rows with different prefix lengths are right-aligned in a ``Pmax`` block whose unused slots are zero
  and masked, and real tokens are left-padded.

Families hold no state. They live in `FAMILIES` (a `esg_memory.registry.Registry` keyed by ``model_type``);
adding one is a single :func:`register_family` call plus a tiny-model test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import InvalidInputError, UnsupportedModelError
from ..registry import Registry

__all__ = [
    "FAMILIES",
    "Family",
    "ModelSpec",
    "PrefixKV",
    "get_family",
    "make_cache",
    "reference_configs",
    "register_family",
    "supported_model_types",
]

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]
"""One prefix: per layer ``(K, V)``, each ``(1, kv_heads, P, head_dim)``."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a model's language tower, read from its config."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    def fingerprint(self) -> str:
        """Identity stored with adapters so one made for another model is never injected."""
        return (
            f"{self.model_type}:L{self.num_layers}:kv{self.num_kv_heads}:d{self.head_dim}"
            f":h{self.hidden_size}:v{self.vocab_size}"
        )

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of K and V for one prefix token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value


@dataclass(frozen=True)
class Family:
    """How one architecture is driven. See the module docstring for the injection rules."""

    model_type: str
    """transformers ``config.model_type`` this entry serves."""
    rope: Literal["1d", "mrope"]
    """``"1d"``: positions from the mask cumsum; ``"mrope"``: explicit 3-D ``get_rope_index`` positions."""
    plain_template: str
    """Prompt template used when the processor has no chat template; ``{image}`` marks the image slot."""
    image_placeholder: str
    """Text inserted for one image in ``plain_template``."""
    answer_prefix: str = ""
    """Text the model emits before an answer in this template (``" "`` after ``ASSISTANT:``)."""

    # ---- structure -------------------------------------------------------------------------------
    def language_model(self, model: Any) -> Any:
        inner = getattr(model, "model", None)
        lm = getattr(inner, "language_model", None)
        if lm is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no model.language_model")
        return lm

    def spec(self, model_or_config: Any) -> ModelSpec:
        """Shape of the language tower, from a model or from its config alone (e.g. a 7B config)."""
        config = getattr(model_or_config, "config", model_or_config)
        cfg = config.get_text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return ModelSpec(
            model_type=config.model_type,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
        )

    # ---- inputs ----------------------------------------------------------------------------------
    def format_prompt(self, processor: Any, prompt: str, has_image: bool) -> str:
        """Turn a user question into the model's prompt text (chat template when the processor has one)."""
        if getattr(processor, "chat_template", None):
            content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
            content.append({"type": "text", "text": prompt})
            return processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return self.plain_template.format(image=self.image_placeholder if has_image else "", prompt=prompt)

    def build_inputs(self, processor: Any, images: Sequence[Any] | None, prompts: Sequence[str]) -> Any:
        """Processor outputs for a batch, left-padded. ``images[i]`` may be None for a text-only row."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise InvalidInputError("prompts must be a non-empty list of non-empty strings")
        imgs = list(images) if images is not None else [None] * len(prompts)
        if len(imgs) != len(prompts):
            raise InvalidInputError(f"{len(imgs)} images for {len(prompts)} prompts")
        texts = [
            self.format_prompt(processor, p, im is not None) for p, im in zip(prompts, imgs, strict=True)
        ]
        present = [im for im in imgs if im is not None]
        # generation needs left padding; asked per call so the user's tokenizer is never modified
        common = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
        if present:
            return processor(images=present, text=texts, **common)
        return processor(text=texts, **common)

    def target_ids(self, processor: Any, answer: str, prompt: str | None = None) -> list[int]:
        """Token ids the model should emit for ``answer`` (then EOS).

        With ``prompt`` (a formatted prompt), the ids are the suffix that tokenizing prompt + answer adds
        to tokenizing the prompt alone, so tokenizers that merge across the boundary or add a prefix
        space (sentencepiece) give the ids generation actually produces.
        """
        tok = processor.tokenizer
        text = self.answer_prefix + answer.strip()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if prompt is not None:
            head = tok(prompt, add_special_tokens=False)["input_ids"]
            full = tok(prompt + text, add_special_tokens=False)["input_ids"]
            if full[: len(head)] == head and len(full) > len(head):
                ids = full[len(head) :]
        eos = tok.eos_token_id
        return [*ids, eos] if eos is not None else list(ids)

    def decode_answers(self, processor: Any, sequences: torch.Tensor, prompt_len: int) -> list[str]:
        new = sequences[:, prompt_len:]
        return [s.strip() for s in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ---- prefix K/V ------------------------------------------------------------------------------
    def statement_kv(
        self, model: Any, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> PrefixKV:
        """The model's own per-layer K/V of a text-only statement at positions 0..P-1 (batch of 1).

        Differentiable w.r.t. ``inputs_embeds`` when grad is enabled (soft-prompt tuning).
        """
        lm = self.language_model(model)
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        out = lm(inputs_embeds=inputs_embeds, use_cache=True)
        cache = out.cache
        return [(layer.keys, layer.values) for layer in cache.layers]

    def prefix_kwargs(
        self, model: Any, inputs: dict[str, Any], prefixes: Sequence[PrefixKV | None], cache_repeat: int = 1
    ) -> dict:
        """Model kwargs that run ``inputs`` with row ``i`` seeing ``prefixes[i]`` (None: nothing).

        Returns a new dict (inputs are not modified): ``cache``, ``attention_mask`` (B x Pmax+L),
        ``position_ids`` plus the untouched remaining inputs. ``cache_repeat``: rows of the cache per
        input row, for ``generate`` with beams / several return sequences (it expands every tensor
        input itself, but not a cache object).
        """
        bsz = inputs["input_ids"].shape[0]
        if len(prefixes) != bsz:
            raise InvalidInputError(f"{len(prefixes)} prefixes for a batch of {bsz}")
        if all(p is None for p in prefixes):
            raise InvalidInputError("prefix_kwargs needs at least one prefix (call the bare model instead)")
        lens = [0 if p is None else int(p[0][0].shape[-2]) for p in prefixes]
        out = dict(inputs)
        out["attention_mask"], out["position_ids"] = self.prefix_layout(model, inputs, lens)
        out["cache"] = make_cache(model, _right_aligned(prefixes, lens, cache_repeat))
        return out

    def prefix_layout(
        self, model: Any, inputs: dict[str, Any], lens: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention_mask, position_ids)`` for prefixes of ``lens``, right-aligned in a max(lens) block."""
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        pmax = max(lens)
        prefix_mask = torch.zeros((input_ids.shape[0], pmax), dtype=mask.dtype, device=mask.device)
        for row, p in enumerate(lens):
            if p:
                prefix_mask[row, pmax - p :] = 1
        full_mask = torch.cat([prefix_mask, mask], dim=1)
        return full_mask, self.positions(model, inputs, mask, full_mask, lens)

    def positions(
        self,
        model: Any,
        inputs: dict[str, Any],
        mask: torch.Tensor,
        full_mask: torch.Tensor,
        lens: Sequence[int],
    ) -> torch.Tensor:
        length = mask.shape[1]
        if self.rope == "1d":
            # exactly what generate derives from the mask, sliced to the input part
            pos = full_mask.long().cumsum(-1) - 1
            return pos.masked_fill(full_mask == 0, 0)[:, -length:]
        shift = torch.tensor(list(lens), dtype=torch.long, device=mask.device).view(1, -1, 1)
        ids = inputs["input_ids"]
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = torch.zeros_like(ids)
        pos, _ = model.model.get_rope_index(
            ids, mm, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), attention_mask=mask
        )
        return pos + shift


def make_cache(model: Any, layers: PrefixKV) -> Any:
    """A fresh ``DynamicCache`` holding ``layers`` (generate/forward append to a cache in place)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers), config=model.config)


def _right_aligned(prefixes: Sequence[PrefixKV | None], lens: Sequence[int], repeat: int) -> PrefixKV:
    bsz, pmax = len(prefixes), max(lens)
    ref = next(p for p in prefixes if p is not None)
    layers = []
    for li, (k0, v0) in enumerate(ref):
        ks = k0.new_zeros((bsz, k0.shape[1], pmax, k0.shape[-1]))
        vs = v0.new_zeros((bsz, v0.shape[1], pmax, v0.shape[-1]))
        for row, pre in enumerate(prefixes):
            if pre is not None:  # unused slots stay zero; the mask hides them
                k, v = pre[li]
                ks[row, :, pmax - lens[row] :] = k[0]
                vs[row, :, pmax - lens[row] :] = v[0]
        if repeat > 1:
            ks, vs = ks.repeat_interleave(repeat, dim=0), vs.repeat_interleave(repeat, dim=0)
        layers.append((ks, vs))
    return layers


def reference_configs() -> dict[str, Any]:
    """Configs of published 7B checkpoints (shapes only, built offline) for size accounting.

    LLaVA-1.5-7B: Llama-2-7B text tower (32 layers, 32 KV heads, head dim 128, hidden 4096).
    Qwen2-VL-7B-Instruct: 28 layers, 28 query / 4 KV heads (head dim 128), hidden 3584.
    """
    from transformers import LlamaConfig, LlavaConfig, Qwen2VLConfig

    llava = LlavaConfig(
        text_config=LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        )
    )
    qwen = Qwen2VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        }
    )
    return {"llava-1.5-7b": llava, "qwen2-vl-7b": qwen}


FAMILIES: Registry[Family] = Registry("model type", UnsupportedModelError)
"""Every supported architecture by ``config.model_type`` (the shared `Registry` mechanism)."""


def register_family(family: Family, *, overwrite: bool = False) -> Family:
    """Add a family. Refuses to silently replace an existing entry unless ``overwrite``."""
    if family.model_type in FAMILIES and not overwrite:
        # InvalidInputError, as before the shared registry (whose duplicate error is ConfigError)
        raise InvalidInputError(f"family {family.model_type!r} already registered (pass overwrite=True)")
    return FAMILIES.register(family.model_type, family, overwrite=overwrite)


def supported_model_types() -> list[str]:
    return FAMILIES.names()


def get_family(model_or_type: Any) -> Family:
    """The family of a model (or a ``model_type`` string); UnsupportedModelError names the supported ones."""
    if isinstance(model_or_type, str):
        return FAMILIES.get(model_or_type)
    return FAMILIES.get(getattr(getattr(model_or_type, "config", None), "model_type", None))


_LLAVA_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"
_QWEN_TEMPLATE = "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n"
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

register_family(Family("llava", "1d", _LLAVA_TEMPLATE, "<image>", answer_prefix=" "))
register_family(
    Family(
        "llava_next",
        "1d",
        _LLAVA_TEMPLATE,
        "<image>",
        answer_prefix=" ",
    )
)
register_family(Family("qwen2_vl", "mrope", _QWEN_TEMPLATE, _QWEN_IMAGE))
register_family(Family("qwen2_5_vl", "mrope", _QWEN_TEMPLATE, _QWEN_IMAGE))
