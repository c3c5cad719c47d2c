"""The embedded default models: a small CLIP and a small LLaVA trained here on easy-vqa.

Both are shipped inside the package (``esg_memory/assets/<name>/``), so the demo, the tests and
the evaluation run offline with models that *know something*: the LLaVA answers easy-vqa's
questions about 64x64 pictures of one coloured shape, and the CLIP places two pictures of a red
circle near each other and far from a blue square. ``scripts/train_default_models.py`` rebuilds
both from PyPI ``easy-vqa`` (MIT), seeded.

Names and loaders:

- ``EASYVQA_CLIP = "esg-easyvqa-clip"``: an open_clip model in open_clip's ``local-dir:`` layout
  (``open_clip_config.json`` + ``open_clip_model.safetensors`` + a small byte-level BPE tokenizer
  the config points open_clip at). :func:`easyvqa_clip_spec` gives what
  ``open_clip.create_model_and_transforms`` needs; ``ClipKeyEncoder(spec.model_name)`` works as is.
- ``EASYVQA_LLAVA = "esg-easyvqa-llava"``: a transformers ``LlavaForConditionalGeneration``
  directory (config, fp16 safetensors, tokenizer, processor with a chat template): CLIP vision
  128 x 3 on 64x64 patch 16 (``"full"`` strategy: 17 image tokens, CLS kept), Llama 128 x 3, 1.45 M
  parameters. :func:`load_easyvqa_llava` returns ``(model, processor)`` in float32, eval mode; the
  config says float32 too, so plain ``from_pretrained(pretrained_path(EASYVQA_LLAVA))`` also upcasts.
- ``PRETRAINED``: the shipped names (an `esg_memory.registry.Registry`: name -> folder of the assets),
  read by ``PRETRAINED_NAMES``, :func:`is_pretrained_name`, :func:`list_pretrained`, :func:`pretrained_path`.

Prompt format the LLaVA was trained on (the same as the LLaVA family's plain template in
:mod:`esg_memory.model.families`, and what the saved chat template renders)::

    "USER: <image>\\n{question} ASSISTANT:"   ->   " {answer}</s>"

Files users load are data only (JSON, safetensors, tokenizer JSON); nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, FormatError
from .registry import Registry

__all__ = [
    "EASYVQA_CLIP",
    "EASYVQA_COLOURS",
    "EASYVQA_LLAVA",
    "EASYVQA_POOL",
    "EASYVQA_SHAPES",
    "PRETRAINED",
    "PRETRAINED_NAMES",
    "PROMPT_TEMPLATE",
    "SCENES_CLIP",
    "SCENES_LLAVA",
    "ClipSpec",
    "caption",
    "derive_subjects",
    "easyvqa_clip_spec",
    "easyvqa_locality_pool",
    "easyvqa_memory_config",
    "format_prompt",
    "is_pretrained_name",
    "list_pretrained",
    "load_easyvqa_llava",
    "load_shipped_llava",
    "pretrained_info",
    "pretrained_name_of",
    "pretrained_path",
    "scenes_memory_config",
]

logger = logging.getLogger(__name__)

EASYVQA_CLIP = "esg-easyvqa-clip"
EASYVQA_LLAVA = "esg-easyvqa-llava"
SCENES_CLIP = "esg-scenes-clip"
SCENES_LLAVA = "esg-scenes-llava"
_ASSETS = Path(__file__).resolve().parent / "assets"
#: The shipped models, each by the folder of ``esg_memory/assets/`` it lives in (one `Registry`, like
#: every name table of the library).
PRETRAINED: Registry[str] = Registry("shipped model")
PRETRAINED.register(EASYVQA_CLIP, EASYVQA_CLIP)
PRETRAINED.register(EASYVQA_LLAVA, EASYVQA_LLAVA)
PRETRAINED.register(SCENES_CLIP, SCENES_CLIP)
PRETRAINED.register(SCENES_LLAVA, SCENES_LLAVA)
PRETRAINED_NAMES: tuple[str, ...] = tuple(PRETRAINED.names())
#: The shipped locality pool of the easy-vqa domain (train-split pictures; not a model, so not in
#: ``PRETRAINED_NAMES``).
EASYVQA_POOL = "esg-easyvqa-pool"

#: The prompt the shipped LLaVA was trained on; the answer follows as ``" {answer}</s>"``.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

#: easy-vqa's shapes and colours (every picture is one shape of one colour).
EASYVQA_SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
EASYVQA_COLOURS: tuple[str, ...] = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")

_INFO_FILE = "esg_pretrained.json"
_INFO_FORMAT = 1
_POOL_FILE = "pool.json"
_POOL_FORMAT = 1
#: Enough "same question, other image" hard negatives to cross every shipped pool picture.
_POOL_HARD_IMAGES = 48
_WORD = re.compile(r"[a-z]+")


def is_pretrained_name(name: object) -> bool:
    """Whether ``name`` is one of the shipped model names."""
    return name in PRETRAINED


def list_pretrained() -> list[str]:
    """The shipped model names."""
    return PRETRAINED.names()


def pretrained_name_of(path: object) -> str | None:
    """The shipped model name whose directory ``path`` is, else None (saved metas record names, not
    the install's site-packages paths)."""
    try:
        p = Path(str(path)).resolve()
    except (OSError, ValueError):
        return None
    return next((n for n in PRETRAINED if (_ASSETS / PRETRAINED.get(n)).resolve() == p), None)


def pretrained_path(name: str) -> Path:
    """The directory holding the shipped model ``name`` (raises :class:`ConfigError` if unknown/missing)."""
    if not is_pretrained_name(name):
        raise ConfigError(f"unknown pretrained model {name!r}; shipped: {', '.join(PRETRAINED_NAMES)}")
    d = _ASSETS / PRETRAINED.get(name)
    if not (d / _INFO_FILE).is_file():
        raise ConfigError(
            f"the shipped model {name!r} is missing from {str(d)!r} (a partial install?); "
            "rebuild it with scripts/train_default_models.py or scripts/train_scenes_models.py"
        )
    return d


def pretrained_info(name: str) -> dict[str, Any]:
    """The training record saved next to a shipped model (figures, seed, data, prompt template)."""
    return _read_versioned_json(pretrained_path(name) / _INFO_FILE, _INFO_FORMAT)


def _read_versioned_json(f: Path, version: int) -> dict[str, Any]:
    """A shipped JSON record, refused unless it is an object of exactly this format version."""
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{str(f)!r} is not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != version:
        raise FormatError(f"{str(f)!r}: expected format_version {version}")
    return doc


def format_prompt(question: str) -> str:
    """The shipped LLaVA's prompt for one question about one image."""
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"question must be a non-empty string, got {question!r}")
    return PROMPT_TEMPLATE.format(question=question.strip())


@dataclass(frozen=True)
class ClipSpec:
    """Everything open_clip needs to build the shipped CLIP offline.

    ``open_clip.create_model_and_transforms(spec.model_name)`` and
    ``open_clip.get_tokenizer(spec.model_name)`` read the directory themselves (config, weights,
    tokenizer). ``model_cfg`` + ``weights`` are the same facts for callers that register the
    architecture themselves; its ``hf_tokenizer_name`` is filled with the tokenizer directory.
    """

    name: str
    """The shipped name (``"esg-easyvqa-clip"``)."""
    directory: Path
    """Directory in open_clip's ``local-dir:`` layout."""
    weights: Path
    """The safetensors weights (fp16; load_state_dict casts them to the model's dtype)."""
    model_cfg: dict[str, Any] = field(repr=False)
    """open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    preprocess_cfg: dict[str, Any] = field(repr=False)
    """open_clip preprocessing (size 64, mean/std used in training)."""

    @property
    def model_name(self) -> str:
        """``"local-dir:<directory>"``: the name open_clip and ``ClipKeyEncoder`` accept."""
        return f"local-dir:{self.directory}"


def easyvqa_clip_spec() -> ClipSpec:
    """The shipped easy-vqa CLIP as a :class:`ClipSpec`."""
    d = pretrained_path(EASYVQA_CLIP)
    f = d / "open_clip_config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
        model_cfg = dict(cfg["model_cfg"])
        pp = dict(cfg.get("preprocess_cfg", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{str(f)!r} is not a valid open_clip config ({e})") from None
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    # a name in the file would make open_clip look it up on the hub outside 'local-dir:' use
    text_cfg["hf_tokenizer_name"] = str(d)
    model_cfg["text_cfg"] = text_cfg
    w = d / "open_clip_model.safetensors"
    if not w.is_file():
        raise ConfigError(f"the shipped CLIP weights are missing: {str(w)!r}")
    return ClipSpec(name=EASYVQA_CLIP, directory=d, weights=w, model_cfg=model_cfg, preprocess_cfg=pp)


def load_easyvqa_llava(dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` of the shipped easy-vqa LLaVA, offline, eval mode (`load_shipped_llava`)."""
    return load_shipped_llava(EASYVQA_LLAVA, dtype, device)


def load_shipped_llava(name: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` of a shipped LLaVA (``esg-easyvqa-llava``, ``esg-scenes-llava``), offline,
    eval mode.

    Args:
        name: the shipped name.
        dtype: torch dtype of the loaded model; default float32 (the weights are stored in fp16,
            which CPUs run slowly and less exactly).
        device: torch device.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if name not in (EASYVQA_LLAVA, SCENES_LLAVA):
        raise ConfigError(f"{name!r} is not a shipped LLaVA ({EASYVQA_LLAVA}, {SCENES_LLAVA})")
    d = pretrained_path(name)
    dtype = torch.float32 if dtype is None else dtype
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(d), dtype=dtype, local_files_only=True)
        processor = AutoProcessor.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FormatError(f"the shipped LLaVA in {str(d)!r} could not be loaded ({e})") from None
    return model.to(device).eval(), processor


def caption(shape: str, colour: str) -> str:
    """The canonical caption of one easy-vqa subject (``"a red circle"``)."""
    if shape not in EASYVQA_SHAPES or colour not in EASYVQA_COLOURS:
        raise ConfigError(f"not an easy-vqa subject: shape={shape!r}, colour={colour!r}")
    return f"a {colour} {shape}"


def derive_subjects(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[str | None, str | None]]:
    """Each picture's ``(shape, colour)`` as implied by its questions' answers (``None`` if undetermined).

    Every easy-vqa picture is one shape of one colour, so each answer narrows two candidate sets:
    "what shape...? circle" fixes the shape, "what is the blue shape? ..." fixes the colour,
    "is there not a red shape? yes" removes red. About 93% of pictures end fully determined.
    """
    if not (len(questions) == len(answers) == len(image_ids)):
        raise ConfigError("questions, answers and image_ids must have the same length")
    shapes: dict[int, set[str]] = {}
    colours: dict[int, set[str]] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        sh = shapes.setdefault(int(i), set(EASYVQA_SHAPES))
        co = colours.setdefault(int(i), set(EASYVQA_COLOURS))
        words = _WORD.findall(q.lower())
        mentioned_s = [w for w in words if w in EASYVQA_SHAPES]
        mentioned_c = [w for w in words if w in EASYVQA_COLOURS]
        if a in ("yes", "no"):
            truth = (a == "yes") != ("not" in words or "no" in words)
            _narrow(sh, mentioned_s, truth)
            _narrow(co, mentioned_c, truth)
        else:
            # a "what ...?" question presupposes what it names ("what is the red shape?")
            _narrow(sh, [*mentioned_s, *([a] if a in EASYVQA_SHAPES else [])], True)
            _narrow(co, [*mentioned_c, *([a] if a in EASYVQA_COLOURS else [])], True)
    out: dict[int, tuple[str | None, str | None]] = {}
    for i in shapes:
        sh, co = shapes[i], colours[i]
        out[i] = (next(iter(sh)) if len(sh) == 1 else None, next(iter(co)) if len(co) == 1 else None)
    return out


def _narrow(cands: set[str], words: Iterable[str], present: bool) -> None:
    for w in words:
        if present:
            cands.intersection_update({w})
        else:
            cands.discard(w)


def easyvqa_locality_pool() -> list[tuple[Path, str]]:
    """The shipped easy-vqa locality pool: ``[(picture path, generic question), ...]``.

    Two *train-split* pictures per (shape, colour) subject (48), each paired with one of six generic
    questions easy-vqa never asks. Pass it as ``EditMemory(encoder, config=easyvqa_memory_config(),
    locality_pool=easyvqa_locality_pool())``: the pairs are inputs no edit may answer, and the pictures
    crossed with each edit's own question are its "same question, other image" hard negatives (pictures
    of the edit's own subject are skipped by ``hard_negative_max_image_sim``). Without such a pool an
    edit's scope only learns from neighbouring edits where other subjects lie, and fires on them.
    """
    d = _ASSETS / EASYVQA_POOL
    f = d / _POOL_FILE
    if not f.is_file():
        raise ConfigError(f"the shipped locality pool is missing: {str(f)!r} (a partial install?)")
    doc = _read_versioned_json(f, _POOL_FORMAT)
    out: list[tuple[Path, str]] = []
    try:
        for row in doc["pictures"]:
            name, question = row["file"], row["question"]
            if not isinstance(name, str) or not isinstance(question, str) or Path(name).name != name:
                raise TypeError(f"bad row {row!r}")
            picture = d / name
            if not picture.is_file():
                raise ConfigError(f"the shipped locality pool is missing {str(picture)!r}")
            out.append((picture, question))
    except (KeyError, TypeError) as e:
        raise FormatError(f"{str(f)!r} is not a valid pool description ({e})") from None
    if not out:
        raise FormatError(f"{str(f)!r} lists no pictures")
    return out


def easyvqa_memory_config(**overrides: Any) -> Any:
    """The recommended :class:`~esg_memory.config.MemoryConfig` for the easy-vqa default domain.

    The library default crosses only 4 pool pictures with each edit's question; here every shipped
    pool picture (48: both pictures of all 24 subjects) is used, so each edit sees the same question
    on every other subject as a negative, and a pool picture counts as "the edit's own subject" (not a
    negative) from image cosine 0.85. ``overrides`` are further ``MemoryConfig`` fields.
    """
    from .config import MemoryConfig

    # Same-subject pictures mostly have image cosine >= 0.85 under the shipped CLIP, pictures of the
    # same colour and another shape mostly below: 0.85 (vs the library's 0.9) keeps more of the pool's
    # own-subject pictures out of the negatives. Chosen on train-split edit streams, not the test split.
    fields = {"n_pool_images": _POOL_HARD_IMAGES, "hard_negative_max_image_sim": 0.85, **overrides}
    try:
        return MemoryConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"not a MemoryConfig field: {e}") from None


def scenes_memory_config(**overrides: Any) -> Any:
    """The recommended :class:`~esg_memory.config.MemoryConfig` for the scenes world with its shipped CLIP
    and `esg_memory.worlds.scenes_locality_pool`: 64 pool pictures crossed with each edit's question (the
    same question on other scenes as negatives; pool subjects are never edited, so none is the edit's
    own subject). ``overrides`` are further ``MemoryConfig`` fields."""
    from .config import MemoryConfig

    fields = {"n_pool_images": 64, **overrides}
    try:
        return MemoryConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"not a MemoryConfig field: {e}") from None
