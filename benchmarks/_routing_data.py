"""Data and text-side encoders of the routing benchmark (see ``bench_routing.py`` for the protocol)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from esg_memory.images import load_image

__all__ = [
    "PixelFeatureTextEncoder",
    "Rec",
    "SubjectTextEncoder",
    "load_pools",
    "load_records",
    "subject_of",
    "subject_png",
]

_COCO = re.compile(r"(\d{6,})\.(?:jpg|png)$")


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Rec:
    source: str
    src: str
    rephrase: str
    answer: str
    subject: str
    subject_rephrase: str
    loc_q: str
    loc_subject: str


def subject_of(path: str) -> str:
    if path.startswith("m."):
        return path.split("/")[0]
    m = _COCO.search(path)
    if not m:
        raise ValueError(f"cannot find a subject id in {path!r}")
    return f"coco:{int(m.group(1))}"


def load_records(data: Path) -> dict[str, list[Rec]]:
    out: dict[str, list[Rec]] = {}
    for name, rel in [
        ("E-VQA", "mmedit-vqa/vqa_eval.json"),
        ("VLKEB", "vlkeb/eval.json"),
        ("E-IC", "mmedit-caption/caption_eval_edit.json"),
    ]:
        recs = json.loads((data / rel).read_text())
        out[name] = [
            Rec(
                name,
                r["src"].strip(),
                r["rephrase"].strip(),
                r["alt"].strip(),
                subject_of(r["image"]),
                subject_of(r["image_rephrase"]),
                r["m_loc_q"].strip(),
                subject_of(r["m_loc"]),
            )
            for r in recs
        ]
    return out


def load_pools(data: Path) -> tuple[list, list]:
    """(memory pool, held-out evaluation pool): halves of NQ and OK-VQA, as (subject|None, text)."""
    nq = json.loads((data / "locality-nq/validation.json").read_text())["questions"]
    nq = [q.removeprefix("nq question:").strip() for q in nq]
    ok = json.loads((data / "locality-okvqa/okvqa_loc.json").read_text())
    okp = [(subject_of(r["image"]), r["question"]) for r in ok]
    h1, h2 = len(nq) // 2, len(okp) // 2
    return ([(None, q) for q in nq[:h1]] + okp[:h2]), ([(None, q) for q in nq[h1:]] + okp[h2:])


def subject_png(subject: str) -> bytes:
    seed = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "little")
    px = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


class SubjectTextEncoder:
    """KeyEncoder for the text-side mode: MiniLM text + seeded subject-id image vectors (see module doc)."""

    def __init__(self, text_encoder, image_weight: float = 0.5) -> None:
        self.text = text_encoder
        self.dim = int(text_encoder.dim)
        self.image_weight = image_weight
        self.name = f"bench-subject-id+{text_encoder.name}:iw={image_weight}"
        self._img: dict[str, np.ndarray] = {}
        self._txt: dict[str, np.ndarray] = {}

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._txt})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            for t, v in zip(chunk, self.text.encode_texts(chunk), strict=True):
                self._txt[t] = v
        return np.stack([self._txt[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def load_cache(self, path: Path) -> None:
        """Reuse text embeddings of an earlier run (same text encoder only): MiniLM on 2 cores is slow."""
        if not path.exists():
            return
        with np.load(path, allow_pickle=False) as z:
            if str(z["name"]) != self.text.name:
                return
            for t, v in zip(z["texts"].tolist(), z["vecs"], strict=True):
                self._txt[t] = v

    def save_cache(self, path: Path) -> None:
        texts = sorted(self._txt)
        np.savez(
            path,
            name=np.asarray(self.text.name),
            texts=np.asarray(texts),
            vecs=np.stack([self._txt[t] for t in texts]),
        )

    def _image_vec(self, image) -> np.ndarray:
        data = image if isinstance(image, bytes) else load_image(image).data
        h = hashlib.sha256(data).hexdigest()
        v = self._img.get(h)
        if v is None:
            px = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8).tobytes()
            seed = int.from_bytes(hashlib.sha256(px).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            v = (v / np.linalg.norm(v)).astype(np.float32)
            self._img[h] = v
        return v

    def encode(self, images, texts) -> np.ndarray:
        images, texts = list(images), list(texts)
        tmask = [t is not None for t in texts]
        tv = self.text_vectors([t for t in texts if t is not None]) if any(tmask) else None
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        j = 0
        for i, (im, t) in enumerate(zip(images, texts, strict=True)):
            v = np.zeros(self.dim, dtype=np.float64)
            if t is not None:
                v += (1 - self.image_weight if im is not None else 1.0) * tv[j]
                j += 1
            if im is not None:
                v += (self.image_weight if t is not None else 1.0) * self._image_vec(im)
            out[i] = v / np.linalg.norm(v)
        return out

    def encode_images(self, images) -> np.ndarray:
        return self.encode(images, [None] * len(images))

    def encode_texts(self, texts) -> np.ndarray:
        return self.encode([None] * len(texts), texts)


class PixelFeatureTextEncoder(SubjectTextEncoder):
    """MiniLM text + a hand-made pixel image tower: colour histogram of the foreground + its silhouette.

    A benchmark stand-in for an image encoder with *some* meaning where no CLIP weights exist here
    (the tiny CLIP has random weights). The silhouette is the foreground mask cropped to its bounding
    box and resized to 8x8, so a shape matches itself wherever and however large it is drawn.
    """

    def __init__(self, text_encoder, image_weight: float = 0.5) -> None:
        super().__init__(text_encoder, image_weight)
        self.name = f"bench-pixel-features+{text_encoder.name}:iw={image_weight}"
        self._proj = np.random.default_rng(7).standard_normal((64 + 64, self.dim)) / np.sqrt(128)

    def _image_vec(self, image) -> np.ndarray:
        li = load_image(image)
        v = self._img.get(li.sha256)
        if v is None:
            arr = np.asarray(li.image, dtype=np.int64)
            bins = (arr // 64) @ np.array([16, 4, 1])
            bg = np.bincount(bins.reshape(-1), minlength=64).argmax()
            fg = bins != bg
            hist = np.bincount(bins[fg], minlength=64).astype(np.float64)
            hist = hist / max(np.linalg.norm(hist), 1e-12)
            sil = np.zeros(64)
            if fg.any():
                ys, xs = np.nonzero(fg)
                crop = fg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
                sil = np.asarray(
                    Image.fromarray(crop).resize((8, 8), Image.BILINEAR), dtype=np.float64
                ).reshape(-1)
                sil = sil - sil.mean()
                sil = sil / max(np.linalg.norm(sil), 1e-12)
            v = np.concatenate([hist, sil]) @ self._proj
            v = (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)
            self._img[li.sha256] = v
        return v
