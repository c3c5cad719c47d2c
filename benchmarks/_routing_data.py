"""Data and text-side encoders of the routing benchmark (see ``bench_routing.py`` for the protocol)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from esg_memory.eval.data import subject_of, subject_png
from esg_memory.eval.textside import SubjectTextEncoder
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
