"""`EditEncoder`: turning an edit's own inputs, the locality pool and cross hard negatives into keys.

Everything here is a function of one edit's content (plus the pool and config), or of one *pair*
of edits for the cross negatives, encoded in batches whose composition depends only on that
content: this is what keeps scopes independent of arrival order (and deletion exact).
Images are looked up by sha256 through a ``blob`` callable: the plan's new images first, then the
memory's committed store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..augment import augment_image, question_templates
from ..config import MemoryConfig
from ..errors import InvalidInputError
from ..images import decode_image, load_image
from ..scope import DEFAULT_LOCALITY_TEXTS, GENERIC_QUESTIONS
from ..types import EditVersion
from ..validate import check_keys, check_text
from .state import EditState, EditVectors, LocalityPool

__all__ = ["BlobLookup", "EditEncoder", "edit_seed"]

#: sha256 -> image bytes (raises KeyError for an unknown one)
BlobLookup = Callable[[str], bytes]


def edit_seed(seed: int, v: EditVersion) -> int:
    """Seed of a version's generated positives: from its content, never its id or arrival order."""
    h = hashlib.sha256(f"{seed}\x00{v.image}\x00{v.question}".encode()).digest()
    return int.from_bytes(h[:4], "little")


class EditEncoder:
    """The memory's key encoder applied to edits: a function of content, config and the pool only."""

    def __init__(self, encoder: Any, config: MemoryConfig) -> None:
        self.encoder = encoder
        self.config = config
        self.dim = int(encoder.dim)

    def keys(self, images: Sequence[Any], texts: Sequence[str | None]) -> np.ndarray:
        """(n, dim) unit keys of (image, text) rows; the encoder's output is checked, never trusted."""
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        return check_keys(
            self.encoder.encode(list(images), list(texts)), len(texts), self.dim, "encoder output"
        )

    def pool(self, pool: Any) -> tuple[LocalityPool, dict[str, bytes]]:
        """The locality pool from texts / (image, text) pairs / precomputed keys (None: built-in texts),
        and the images it stores (its first ``n_pool_images`` distinct pictures, the hard negatives)."""
        n = self.config.locality_pool_size
        if isinstance(pool, np.ndarray):
            keys = check_keys(pool, None, self.dim, "locality_pool")[:n]
            return LocalityPool(keys=keys, images=(), image_vecs=np.zeros((0, self.dim), np.float32)), {}
        items: list[tuple[Any, str | None]] = []
        src = DEFAULT_LOCALITY_TEXTS if pool is None else pool
        if isinstance(src, (str, bytes, Mapping)) or not isinstance(src, Iterable):
            raise InvalidInputError(
                "locality_pool must be a sequence of texts / (image, text) pairs, or keys"
            )
        for j, it in enumerate(src):
            if len(items) >= n:
                break
            if isinstance(it, str):
                items.append((None, check_text(it, f"locality_pool[{j}]")))
            elif isinstance(it, (tuple, list)) and len(it) == 2:
                img, txt = it
                txt = None if txt is None else check_text(txt, f"locality_pool[{j}] text")
                if img is None and txt is None:
                    raise InvalidInputError(f"locality_pool[{j}] has neither image nor text")
                items.append((None if img is None else load_image(img), txt))
            else:
                raise InvalidInputError(f"locality_pool[{j}] must be a text or an (image, text) pair")
        keys = np.zeros((0, self.dim), dtype=np.float32)
        for start in range(0, len(items), 256):
            chunk = items[start : start + 256]
            keys = np.concatenate(
                [keys, self.keys([None if im is None else im.data for im, _ in chunk], [t for _, t in chunk])]
            )
        hard: dict[str, bytes] = {}
        for im, _ in items:
            if im is not None and len(hard) < self.config.n_pool_images and im.sha256 not in hard:
                hard[im.sha256] = im.data
        vecs = self.image_vecs(list(hard.values()))
        return LocalityPool(keys=keys, images=tuple(hard), image_vecs=vecs), hard

    def image_vecs(self, images: list[Any]) -> np.ndarray:
        """Image-only embeddings (the filters of 'other image' hard negatives)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return check_keys(self.encoder.encode_images(images), len(images), self.dim, "encoder image output")

    def version(self, v: EditVersion, blob: BlobLookup, pool: LocalityPool) -> EditVectors:
        """Encode one version's own inputs: a function of its content, the pool and the config only."""
        cfg = self.config
        img = None if v.image is None else blob(v.image)
        q = v.question
        txt = check_keys(
            self.encoder.encode_texts([q, *GENERIC_QUESTIONS]),
            1 + len(GENERIC_QUESTIONS),
            self.dim,
            "encoder text output",
        )
        qtext = txt[0]
        ivec = self.image_vecs([img])[0] if img is not None else np.zeros(self.dim, np.float32)
        rows: list[tuple[Any, str | None]] = [(img, q)]
        labels = ["anchor"]
        seen = {(v.image, q)}
        for j, p in enumerate(v.positives):
            pair = (p.image or v.image, p.text or q)
            if pair not in seen:
                seen.add(pair)
                rows.append((None if pair[0] is None else blob(pair[0]), pair[1]))
                labels.append(f"user {j}")
        for j, t in enumerate(question_templates(q)[: cfg.n_text_positives]):
            if (v.image, t) not in seen:
                seen.add((v.image, t))
                rows.append((img, t))
                labels.append(f"template {j}")
        if img is not None and cfg.n_image_positives:
            pil = decode_image(img, "edit image")
            for j, aug in enumerate(augment_image(pil, cfg.n_image_positives, seed=edit_seed(cfg.seed, v))):
                rows.append((aug, q))
                labels.append(f"augment {j}")
        fb_pos = [f for f in v.feedback if f.kind == "positive"]
        fb_neg = [f for f in v.feedback if f.kind == "negative"]
        for j, f in enumerate(fb_pos):
            rows.append((None if f.image is None else blob(f.image), f.text))
            labels.append(f"feedback {j}")
        n_cand = len(rows)
        neg_labels: list[str] = []
        if img is not None:
            sims = txt[1:].astype(np.float64) @ qtext.astype(np.float64)
            picked = [
                g for g, s in zip(GENERIC_QUESTIONS, sims, strict=True) if s < cfg.hard_negative_max_text_sim
            ][: cfg.n_generic_questions]
            for g in picked:
                rows.append((img, g))
                neg_labels.append(f"same image, generic question {g!r}")
            isims = pool.image_vecs.astype(np.float64) @ ivec.astype(np.float64)
            for j, sha in enumerate(pool.images):
                # A pool image this close to the edit's own shows the same subject: not "another image".
                if sha != v.image and isims[j] < cfg.hard_negative_max_image_sim:
                    rows.append((blob(sha), q))
                    neg_labels.append(f"same question, locality image {j}")
        for j, f in enumerate(fb_neg):
            rows.append((None if f.image is None else blob(f.image), f.text))
            neg_labels.append(f"feedback-negative {j}")
        keys = self.keys([r[0] for r in rows], [r[1] for r in rows])
        return EditVectors(
            cand=keys[:n_cand],
            cand_labels=tuple(labels),
            own_neg=keys[n_cand:],
            own_neg_labels=tuple(neg_labels),
            qtext=qtext,
            ivec=ivec,
        )

    def cross(self, lo: EditState, hi: EditState, blob: BlobLookup) -> tuple[np.ndarray, list[str]]:
        """One edit's image with the other's question and vice versa: negatives of both (see `Plan`)."""
        a, b = lo.current, hi.current
        empty = (np.zeros((0, self.dim), dtype=np.float32), [])
        if a.image is None or b.image is None or a.image == b.image:
            return empty
        tsim = float(lo.vec.qtext.astype(np.float64) @ hi.vec.qtext.astype(np.float64))
        isim = float(lo.vec.ivec.astype(np.float64) @ hi.vec.ivec.astype(np.float64))
        if tsim >= self.config.hard_negative_max_text_sim or isim >= self.config.hard_negative_max_image_sim:
            # Paraphrased questions or same-subject images: a crossed input is then (nearly) the other
            # edit's own anchor, which already is a negative when the answers differ.
            return empty
        vecs = self.keys([blob(a.image), blob(b.image)], [b.question, a.question])
        return vecs, [
            f"image of edit {lo.id} + question of edit {hi.id}",
            f"image of edit {hi.id} + question of edit {lo.id}",
        ]
