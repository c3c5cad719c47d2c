"""`CompositeKeyEncoder` (any text encoder + any image encoder) and the named-encoder registry.

`create_encoder` turns a spec string into an encoder; its names live in ``ENCODERS``, one
`esg_memory.registry.Registry` like every other name table of the library.

Two towers that were not trained together do not share an embedding space, and usually not
even a dimension (MiniLM: 384, a CLIP image tower: 64-1024). Fusion then works like this:

- ``fuse="concat"`` (default here): ``[sqrt(w) * img, sqrt(1 - w) * txt]``; the key's
  dimension is the sum of the two. Text-only and image-only rows put zeros in the other
  part, so the cross-modal cosine is exactly 0: nothing pretends the spaces are related.
- ``fuse="sum"`` / ``"product"`` with unequal dims: the smaller embedding is mapped into
  the larger dimension by a fixed random matrix with orthonormal columns (seeded, so keys
  are reproducible; norm-preserving, so unit stays unit), then fused as in `ClipKeyEncoder`.
  With unrelated towers this adds cross terms of pure noise (~1/sqrt(d)) to every cosine.

Measured (``benchmarks/bench_fusion.py``, MiniLM + the easy-vqa-aligned tiny CLIP, 600 edits):
concat ties sum at w=0.5 (AUC 0.968 both) and is more robust to the weight (w=0.3: concat
0.960, sum 0.887; w=0.7: 0.946 vs 0.912), and it keeps image-only probes clean. Neither
gives cross-modal reach here (caption-to-image AUC <= 0.58): MiniLM and CLIP's image tower
share no space, so there is nothing for sum to preserve. Hence concat is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..images import ImageLike
from ..registry import Registry
from .base import CacheInfo, KeyEncoder, as_rows, check_fuse, check_rows, fuse_embeddings
from .clip import TINY_CLIP_NAME, ClipKeyEncoder, register_tiny_clip
from .text import MiniLMTextEncoder

__all__ = ["ENCODERS", "CompositeKeyEncoder", "create_encoder", "list_encoders", "register_encoder"]


def _tower(enc: Any, kind: str) -> tuple[Callable[[list], np.ndarray], int]:
    """The raw-embedding method of a sub-encoder (``embed_*`` when it has one) and its dim."""
    raw = getattr(enc, f"embed_{kind}", None)
    if callable(raw) and isinstance(getattr(enc, "embed_dim", None), int):
        return raw, enc.embed_dim
    return getattr(enc, f"encode_{kind}"), int(enc.dim)


def _orthonormal(d_out: int, d_in: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((d_out, d_in))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)  # sign fix: a unique, seed-determined basis


class CompositeKeyEncoder:
    """Keys from one encoder's text tower and another's image tower (see the module docstring).

    Args:
        text_encoder: any :class:`KeyEncoder` able to encode texts (e.g. `MiniLMTextEncoder`).
        image_encoder: any :class:`KeyEncoder` able to encode images (e.g. `ClipKeyEncoder`).
        fuse: ``"concat"`` (default) | ``"sum"`` | ``"product"``.
        image_weight: the image's share ``w`` in ``[0, 1]``.
        seed: seed of the projection used by sum/product when the dims differ.
    """

    def __init__(
        self,
        text_encoder: KeyEncoder,
        image_encoder: KeyEncoder,
        *,
        fuse: str = "concat",
        image_weight: float = 0.5,
        seed: int = 0,
    ) -> None:
        for what, enc in (("text_encoder", text_encoder), ("image_encoder", image_encoder)):
            if not isinstance(enc, KeyEncoder):
                raise ConfigError(f"{what} must implement KeyEncoder, got {type(enc).__name__}")
        self.image_weight = check_fuse(fuse, image_weight)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        self.fuse, self.seed = fuse, seed
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self._embed_texts, dt = _tower(text_encoder, "texts")
        self._embed_images, di = _tower(image_encoder, "images")
        self._proj_t = self._proj_i = None
        proj = ""
        if fuse != "concat" and dt != di:
            if dt < di:
                self._proj_t = _orthonormal(di, dt, seed)
            else:
                self._proj_i = _orthonormal(dt, di, seed)
            proj = f":proj=orth-seed{seed}"
        self.dim = dt + di if fuse == "concat" else max(dt, di)
        # per-part widths after projection
        self._di, self._dt = (di, dt) if fuse == "concat" else (self.dim, self.dim)
        tail = f":iw={self.image_weight:g}" if fuse != "product" else ""
        self.name = f"composite[text={text_encoder.name}|image={image_encoder.name}]:fuse={fuse}{tail}{proj}"

    def encode(self, images: Sequence[ImageLike | None], texts: Sequence[str | None]) -> np.ndarray:
        """Keys for rows with an image, a text or both: ``(n, dim)`` float32, unit rows."""
        ims, txs = check_rows(images, texts)
        n = len(ims)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        has_i = np.array([im is not None for im in ims], dtype=bool)
        has_t = np.array([tx is not None for tx in txs], dtype=bool)
        img = self._part(self._embed_images, [i for i in ims if i is not None], has_i, self._di, self._proj_i)
        txt = self._part(self._embed_texts, [t for t in txs if t is not None], has_t, self._dt, self._proj_t)
        return fuse_embeddings(img, txt, has_i, has_t, self.fuse, self.image_weight)

    @staticmethod
    def _part(fn: Callable, items: list, mask: np.ndarray, dim: int, proj: np.ndarray | None) -> np.ndarray:
        out = np.zeros((len(mask), dim), dtype=np.float32)
        if items:
            e = np.asarray(fn(items), dtype=np.float32)
            out[mask] = e @ proj.T if proj is not None else e
        return out

    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        rows = as_rows(images, "images")
        return self.encode(rows, [None] * len(rows))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = as_rows(texts, "texts")
        return self.encode([None] * len(rows), rows)

    def to(self, device: Any) -> CompositeKeyEncoder:
        """Move both sub-encoders that can move (`CachedTowers.to`: device only, dtype kept); returns self."""
        for enc in (self.text_encoder, self.image_encoder):
            move = getattr(enc, "to", None)
            if callable(move):
                move(device)
        return self

    def cache_info(self) -> CacheInfo:
        """The two sub-encoders' cache counters, added up."""
        infos = [e.cache_info() for e in (self.text_encoder, self.image_encoder) if hasattr(e, "cache_info")]
        return CacheInfo(*(sum(getattr(i, f) for i in infos) for f in ("hits", "misses", "size", "maxsize")))

    def __repr__(self) -> str:
        return f"CompositeKeyEncoder(name={self.name!r}, dim={self.dim})"


#: Named encoder factories: ``factory(**kwargs) -> KeyEncoder`` (the shipped ones are registered below).
ENCODERS: Registry[Callable[..., KeyEncoder]] = Registry("key encoder")


def register_encoder(name: str, factory: Callable[..., KeyEncoder], *, overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> KeyEncoder`` under ``name`` for :func:`create_encoder`."""
    # stricter than Registry's own check: these characters are spec syntax ("a+b", "arch:weights")
    if not isinstance(name, str) or not name or any(c in name for c in "+:/\\") or name != name.strip():
        raise ConfigError(f"encoder names are non-empty and contain no '+', ':', '/', '\\\\': {name!r}")
    if not callable(factory):
        raise ConfigError(f"factory for {name!r} is not callable")
    ENCODERS.register(name, factory, overwrite=overwrite)


def list_encoders() -> list[str]:
    """Registered encoder names (any open_clip architecture name also works in `create_encoder`)."""
    return ENCODERS.names()


def create_encoder(spec: str, **kwargs: Any) -> KeyEncoder:
    """Build an encoder from a spec string.

    - a registered name: ``"esg-tiny-clip"``, ``"minilm"``;
    - an open_clip architecture, optionally with weights: ``"ViT-B-32"``,
      ``"ViT-B-32:/path/weights.safetensors"``, ``"ViT-B-32:laion2b_s34b_b79k"`` (cached tag);
    - ``"local-dir:/path"`` or ``"hf-hub:org/repo"``;
    - ``"<text spec>+<image spec>"``: a `CompositeKeyEncoder`, e.g. ``"minilm+esg-tiny-clip"``
      (split at the first ``+``). ``kwargs`` go to the outermost constructor.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"encoder spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in ENCODERS:
        return ENCODERS.get(spec)(**kwargs)
    if spec.startswith(("local-dir:", "hf-hub:")):
        return ClipKeyEncoder(spec, **kwargs)
    if "+" in spec:
        text_spec, image_spec = spec.split("+", 1)
        return CompositeKeyEncoder(create_encoder(text_spec), create_encoder(image_spec), **kwargs)
    import open_clip

    register_tiny_clip()
    arch, _, weights = spec.partition(":")
    if arch in open_clip.list_models():
        return ClipKeyEncoder(arch, pretrained=weights or None, **kwargs)
    raise ConfigError(
        f"unknown encoder {spec!r}. Registered: {', '.join(list_encoders())}. open_clip architectures "
        f"(optionally ':<weights file or tag>'): {', '.join(open_clip.list_models())}. "
        "Also 'local-dir:<dir>', 'hf-hub:<repo>' and '<text spec>+<image spec>'."
    )


register_encoder(TINY_CLIP_NAME, lambda **kw: ClipKeyEncoder(TINY_CLIP_NAME, **kw))
register_encoder("minilm", MiniLMTextEncoder)
register_encoder("esg-easyvqa-clip", lambda **kw: ClipKeyEncoder("esg-easyvqa-clip", **kw))
register_encoder("esg-scenes-clip", lambda **kw: ClipKeyEncoder("esg-scenes-clip", **kw))
