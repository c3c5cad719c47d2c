"""Tiny, seeded, fully offline multimodal models for tests, demos and benchmarks.

Every builder returns ``(model, processor)`` built from configs only (random weights, no hub access),
with a byte-level BPE tokenizer trained on a small built-in corpus. With ``out_dir`` the pair is saved
with ``save_pretrained`` so ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and
``AutoProcessor.from_pretrained(out_dir)`` reload it offline. Same seed -> same weights and tokenizer.

These models are *random*: they cannot follow instructions, so a compiled adapter (a statement of the
fact) rarely changes their answer; a tuned adapter can. They exist to test the mechanics exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = [
    "TINY_BUILDERS",
    "build_tiny",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_tokenizer",
]

logger = logging.getLogger(__name__)

_COLORS = ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown", "white", "purple", "orange"]
_SHAPES = ["circle", "rectangle", "triangle", "square", "star", "shape"]
_WORDS = (
    "what color is the shape ? what is the color of the shape ? which shape is in the image ? "
    "does the image contain a circle ? is there a red shape ? yes no the answer is question answer "
    "user assistant describe this picture photo of a dog cat bird car tree house person city flag "
    "who painted this painting ? where was this taken ? how many objects are there ? one two three four "
    "the capital of france is paris . the tower is in the city . this landmark is famous ."
)

# Wider than transformers' 0.02 so the random language model has decisive logits (margins of a few
# units, like a trained model) instead of a near-uniform distribution where every argmax is a near tie.
_TEXT_INIT = 0.1

_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A minimal Qwen-style chat template so the chat-template code path is exercised by the tiny Qwen models.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    lines = [_WORDS]
    for c in _COLORS:
        for s in _SHAPES:
            lines.append(f"USER: <image>\nwhat color is the {s}? ASSISTANT: {c}")
            lines.append(f"Question: what is the color of the {s}? Answer: {c}.")
            lines.append(f"there is a {c} {s} in the image. the {s} is {c}.")
    return lines


def build_tiny_tokenizer(specials: list[str] | None = None, vocab_size: int = 600, qwen: bool = False) -> Any:
    """Train a byte-level BPE on the built-in corpus and wrap it as a ``PreTrainedTokenizerFast``.

    Deterministic: the corpus is fixed and BPE training is single-threaded over a fixed order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(specials or (_QWEN_SPECIALS if qwen else _LLAVA_SPECIALS))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    extra: dict[str, str] = (
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        }
        if qwen
        else {"image_token": "<image>"}
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>" if qwen else "</s>",
        pad_token="<pad>",
        extra_special_tokens=extra,
    )
    fast.padding_side = "left"
    return fast


def _finish(model: Any, processor: Any, out_dir: str | Path | None) -> tuple[Any, Any]:
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        logger.info("saved tiny %s to %s", model.config.model_type, out)
    return model, processor


def _llama_text(tok: Any, hidden: int, layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=_TEXT_INIT,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def build_tiny_llava(
    out_dir: str | Path | None = None, seed: int = 0, hidden: int = 64, layers: int = 2, image_size: int = 32
) -> tuple[Any, Any]:
    """A ~0.2M-parameter LLaVA (CLIP vision 32-wide, Llama ``hidden``-wide) with its ``LlavaProcessor``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text(tok, hidden, layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _finish(model, processor, out_dir)


def build_tiny_llava_next(
    out_dir: str | Path | None = None, seed: int = 0, hidden: int = 64, layers: int = 2
) -> tuple[Any, Any]:
    """A tiny LLaVA-NeXT (any-resolution tiling on a 32px base grid)."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_llama_text(tok, hidden, layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
        image_seq_length=16,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _finish(model, processor, out_dir)


def _qwen_parts(tok: Any, hidden: int, layers: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": _TEXT_INIT,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def _qwen_ids(tok: Any) -> dict[str, int]:
    return {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_image_processor(cls: Any) -> Any:
    # 32x32 images -> a 4x4 patch grid (patch 8) -> 4 merged image tokens; bounds keep every image that size.
    return cls(
        size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
    )


def build_tiny_qwen2_vl(
    out_dir: str | Path | None = None, seed: int = 0, hidden: int = 64, layers: int = 2
) -> tuple[Any, Any]:
    """A tiny Qwen2-VL (3-D mRoPE) with a ``Qwen2VLProcessor`` and a Qwen-style chat template."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    tok = build_tiny_tokenizer(qwen=True)
    config = Qwen2VLConfig(
        text_config=_qwen_parts(tok, hidden, layers),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_ids(tok),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    processor = _qwen_processor(Qwen2VLProcessor, Qwen2VLImageProcessor, tok)
    return _finish(model, processor, out_dir)


def _qwen_processor(proc_cls: Any, img_cls: Any, tok: Any) -> Any:
    from transformers import Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 32 * 32},
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
    )
    return proc_cls(
        image_processor=_qwen_image_processor(img_cls),
        tokenizer=tok,
        video_processor=video,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def build_tiny_qwen2_5_vl(
    out_dir: str | Path | None = None, seed: int = 0, hidden: int = 64, layers: int = 2
) -> tuple[Any, Any]:
    """A tiny Qwen2.5-VL (windowed vision attention, 3-D mRoPE)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    tok = build_tiny_tokenizer(qwen=True)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_parts(tok, hidden, layers),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,
            "fullatt_block_indexes": [1],
        },
        **_qwen_ids(tok),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = _qwen_processor(Qwen2_5_VLProcessor, Qwen2VLImageProcessor, tok)
    return _finish(model, processor, out_dir)


TINY_BUILDERS = {
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
}


def build_tiny(
    model_type: str, out_dir: str | Path | None = None, seed: int = 0, **kwargs: Any
) -> tuple[Any, Any]:
    """Build the tiny model of one family by its ``model_type``."""
    try:
        builder = TINY_BUILDERS[model_type]
    except KeyError:
        raise ConfigError(f"no tiny builder for {model_type!r}; known: {sorted(TINY_BUILDERS)}") from None
    return builder(out_dir=out_dir, seed=seed, **kwargs)
