"""The saved identity of an edited model: ``edited_model.json``, written and read back, refusing other models.

`EditedModel.save` writes ``edited_model.json`` next to the memory (`write_meta`): the model type, the
architecture fingerprint adapters are stamped with (`ModelSpec.fingerprint`), a small sample of the
input embeddings and the wrapper's `EditedModelConfig`. The fingerprint alone cannot tell two
checkpoints of one architecture apart (a tuned adapter learned on one is wrong on the other), hence
the sample; it is compared with a tolerance so the same weights loaded in float16 or bfloat16 still
match.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from index import atomic_write_bytes

from ..config import AdapterConfig, EditedModelConfig
from ..errors import ConfigError, EncoderMismatchError, FormatError, ModelMismatchError
from .families import get_family

__all__ = [
    "MEMORY_DIR",
    "META_FILE",
    "MODEL_FORMAT_VERSION",
    "check_encoder",
    "check_model",
    "config_from_meta",
    "hub_kwargs",
    "open_memory",
    "read_meta",
    "weights_probe",
    "write_meta",
]

MODEL_FORMAT_VERSION = 1
META_FILE = "edited_model.json"
MEMORY_DIR = "memory"


def read_meta(path: Path) -> dict | None:
    """The directory's edited_model.json, checked; None for a plain memory directory (or a new one)."""
    f = path / META_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{f}: not a readable JSON file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "esg-memory-edited-model":
        raise FormatError(f"{f} is not an esg-memory wrapper file")
    fv = meta.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise FormatError(f"{f} has no valid format_version ({fv!r})")
    if fv > MODEL_FORMAT_VERSION:
        raise FormatError(f"{path} was written by a newer esg-memory (format {fv} > {MODEL_FORMAT_VERSION})")
    for key in ("model_type", "model"):
        if not isinstance(meta.get(key), str):
            raise FormatError(f"{f}: {key!r} must be a string")
    probe = meta.get("weights_probe")
    if probe is not None and (
        not isinstance(probe, list)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in probe)
    ):
        raise FormatError(f"{f}: 'weights_probe' must be a list of numbers")
    if not isinstance(meta.get("config", {}), dict):
        raise FormatError(f"{f}: 'config' must be an object")
    return meta


def write_meta(
    directory: Path, model_type: str, fingerprint: str, model: Any, config: EditedModelConfig
) -> None:
    """Write ``directory/edited_model.json`` for a base model and the wrapper config (atomically)."""
    meta = {
        "format": "esg-memory-edited-model",
        "format_version": MODEL_FORMAT_VERSION,
        "model_type": model_type,
        "model": fingerprint,
        "weights_probe": weights_probe(model),
        "name_or_path": base_name(model),
        "config": asdict(config),
    }
    atomic_write_bytes(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def base_name(model: Any) -> str:
    """What ``from_pretrained(dir)`` reloads the base from: a shipped model's registered name (never the
    install's path), else the HF id or directory the model was loaded from ("" when it has none)."""
    from ..pretrained import pretrained_name_of

    src = str(getattr(model, "name_or_path", "") or "")
    return (pretrained_name_of(src) if src else None) or src


def config_from_meta(meta: dict) -> EditedModelConfig:
    """The `EditedModelConfig` saved in a checked `read_meta` result; FormatError when it is invalid."""
    try:
        cfg = EditedModelConfig(**meta.get("config", {}))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise FormatError(f"saved wrapper config is invalid: {exc}") from None
    if not isinstance(cfg.adapters, AdapterConfig):
        raise FormatError("saved wrapper config is invalid: 'adapters' must be an object")
    return cfg


_PROBE_N = 16


def weights_probe(model: Any) -> list[float] | None:
    """A few input-embedding values at fixed positions: tells two checkpoints of one architecture apart.

    Compared with a tolerance (`check_model`), so the same weights loaded in another dtype match;
    None when the weights cannot be read here (e.g. offloaded to the meta device).
    """
    try:
        w = model.get_input_embeddings().weight
        if w.device.type == "meta" or w.dim() != 2:
            return None
        rows, cols = w.shape
        # positions from plain integer arithmetic (not an RNG whose algorithm could change between
        # torch versions), spread over the matrix; skip row 0, often a zeroed padding embedding
        i = torch.arange(_PROBE_N)
        r = (1 + (i * 2654435761 + 40503) % max(rows - 1, 1)) % rows
        c = (i * 97 + 13) % cols
        with torch.no_grad():
            return [float(v) for v in w[r.to(w.device), c.to(w.device)].float().cpu()]
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return None


def check_model(path: Path, model: Any) -> None:
    """Refuse a wrapper directory saved for another base model, saying what differs.

    ``model`` may also be a transformers config (checks the architecture only, before loading weights).
    """
    meta = read_meta(path)
    if meta is None:
        return  # a plain memory: adapters carry their own fingerprint and are recompiled when foreign
    family = get_family(getattr(model, "config", model).model_type)
    diffs = []
    if meta["model_type"] != family.model_type:
        diffs.append(f"model type {meta['model_type']!r} (saved) vs {family.model_type!r} (given)")
    mine = family.spec(model).fingerprint()
    if meta["model"] != mine:
        diffs.append(f"architecture {meta['model']!r} (saved) vs {mine!r} (given)")
    saved, now = meta.get("weights_probe"), weights_probe(model)
    if not diffs and saved is not None and now is not None:
        a, b = torch.tensor(saved, dtype=torch.float64), torch.tensor(now, dtype=torch.float64)
        # rtol covers fp16/bf16 rounding of the same checkpoint; another checkpoint differs by ~100%
        if a.shape != b.shape or not torch.allclose(b, a, rtol=2e-2, atol=1e-5):
            diffs.append("weights: same architecture but another checkpoint (input-embedding sample differs)")
    if diffs:
        raise ModelMismatchError(
            f"{path} was saved for another model: {'; '.join(diffs)}. To reuse its edits with this model "
            f"anyway, pass memory=EditMemory.load({str(path / MEMORY_DIR)!r}) (adapters are recompiled)"
        )


def open_memory(path: Path, encoder: Any, durable: bool = False) -> tuple[Any, dict | None]:
    """The memory of a wrapper or plain memory directory (new when missing or empty), and its checked meta."""
    from ..memory import EditMemory

    meta = read_meta(path)
    if meta is not None:
        path = path / MEMORY_DIR
    new = not path.exists() or (meta is None and path.is_dir() and not any(path.iterdir()))
    if new and encoder is None:
        raise ConfigError(f"{path} does not exist; pass encoder= to start a new memory there")
    if durable:
        # a new durable wrapper directory gets the wrapper layout (DIR/edited_model.json + DIR/memory)
        return EditMemory.open(path / MEMORY_DIR if new and meta is None else path, encoder), meta
    if new:
        return EditMemory(encoder), meta
    return EditMemory.load(path, encoder=encoder), meta


def check_encoder(memory: Any, encoder: Any) -> None:
    """Refuse an ``encoder`` (None: nothing to check) other than the one the memory's keys were made by."""
    if encoder is None:
        return
    mine = memory.encoder
    if int(encoder.dim) != int(mine.dim):
        raise EncoderMismatchError(f"encoder dim {encoder.dim} != memory's encoder dim {mine.dim}")
    if getattr(encoder, "name", None) != getattr(mine, "name", None):
        raise EncoderMismatchError(f"encoder {encoder.name!r} differs from the memory's {mine.name!r}")


def hub_kwargs(hf_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that also apply to loading a config or a processor."""
    keep = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code")
    return {k: v for k, v in hf_kwargs.items() if k in keep}
