"""Encoding an edit's own inputs, the locality pool and cross hard negatives (`EditMemory` internals).

Everything here is a function of one edit's content (plus the pool and config), or of one *pair*
of edits for the cross negatives, encoded in batches whose composition depends only on that
content: this is what keeps scopes independent of arrival order.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ._memory_state import EditState, EditVectors
from ._memory_util import edit_seed
from .augment import augment_image, question_templates
from .errors import InvalidInputError
from .images import load_image
from .scope import DEFAULT_LOCALITY_TEXTS, GENERIC_QUESTIONS
from .types import EditVersion
from .validate import check_keys, check_text

__all__ = ["EncodingMixin"]


class EncodingMixin:
    """Encoding half of `EditMemory` (uses its ``encoder``, ``config``, ``_blobs``, ``_pool_images``)."""

    def _encode(self, images: Sequence[Any], texts: Sequence[str | None]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, int(self.encoder.dim)), dtype=np.float32)
        return check_keys(
            self.encoder.encode(list(images), list(texts)),
            len(texts),
            int(self.encoder.dim),
            "encoder output",
        )

    def _encode_pool(self, pool: Any) -> tuple[np.ndarray, list[str]]:
        n = self.config.locality_pool_size
        if isinstance(pool, np.ndarray):
            return check_keys(pool, None, int(self.encoder.dim), "locality_pool")[:n], []
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
        keys = np.zeros((0, int(self.encoder.dim)), dtype=np.float32)
        for start in range(0, len(items), 256):
            chunk = items[start : start + 256]
            keys = np.concatenate(
                [
                    keys,
                    self._encode([None if im is None else im.data for im, _ in chunk], [t for _, t in chunk]),
                ]
            )
        hard: list[str] = []
        for im, _ in items:
            if im is not None and len(hard) < self.config.n_pool_images and im.sha256 not in hard:
                self._blobs[im.sha256] = im.data
                hard.append(im.sha256)
        self._pool_image_vecs = self._image_vecs([self._blobs[h] for h in hard])
        return keys, hard

    def _image_vecs(self, images: list[Any]) -> np.ndarray:
        dim = int(self.encoder.dim)
        if not images:
            return np.zeros((0, dim), dtype=np.float32)
        return check_keys(self.encoder.encode_images(images), len(images), dim, "encoder image output")

    def _blob(self, sha: str | None, extra: Mapping[str, bytes]) -> bytes | None:
        if sha is None:
            return None
        return extra[sha] if sha in extra else self._blobs[sha]

    def _encode_version(self, v: EditVersion, extra: Mapping[str, bytes]) -> EditVectors:
        """Encode one version's own inputs: a function of its content, the pool and the config only."""
        cfg = self.config
        img = self._blob(v.image, extra)
        q = v.question
        txt = check_keys(
            self.encoder.encode_texts([q, *GENERIC_QUESTIONS]),
            1 + len(GENERIC_QUESTIONS),
            int(self.encoder.dim),
            "encoder text output",
        )
        qtext = txt[0]
        ivec = self._image_vecs([img])[0] if img is not None else np.zeros(int(self.encoder.dim), np.float32)
        rows: list[tuple[Any, str | None]] = [(img, q)]
        labels = ["anchor"]
        seen = {(v.image, q)}
        for j, p in enumerate(v.positives):
            pair = (p.image or v.image, p.text or q)
            if pair not in seen:
                seen.add(pair)
                rows.append((self._blob(pair[0], extra), pair[1]))
                labels.append(f"user {j}")
        for j, t in enumerate(question_templates(q)[: cfg.n_text_positives]):
            if (v.image, t) not in seen:
                seen.add((v.image, t))
                rows.append((img, t))
                labels.append(f"template {j}")
        if img is not None and cfg.n_image_positives:
            pil = Image.open(io.BytesIO(img)).convert("RGB")
            for j, aug in enumerate(augment_image(pil, cfg.n_image_positives, seed=edit_seed(cfg.seed, v))):
                rows.append((aug, q))
                labels.append(f"augment {j}")
        fb_pos = [f for f in v.feedback if f.kind == "positive"]
        fb_neg = [f for f in v.feedback if f.kind == "negative"]
        for j, f in enumerate(fb_pos):
            rows.append((self._blob(f.image, extra), f.text))
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
            isims = self._pool_image_vecs.astype(np.float64) @ ivec.astype(np.float64)
            for j, sha in enumerate(self._pool_images):
                # A pool image this close to the edit's own shows the same subject: not "another image".
                if sha != v.image and isims[j] < cfg.hard_negative_max_image_sim:
                    rows.append((self._blobs[sha], q))
                    neg_labels.append(f"same question, locality image {j}")
        for j, f in enumerate(fb_neg):
            rows.append((self._blob(f.image, extra), f.text))
            neg_labels.append(f"feedback-negative {j}")
        keys = self._encode([r[0] for r in rows], [r[1] for r in rows])
        return EditVectors(
            cand=keys[:n_cand],
            cand_labels=tuple(labels),
            own_neg=keys[n_cand:],
            own_neg_labels=tuple(neg_labels),
            qtext=qtext,
            ivec=ivec,
        )

    def _encode_cross(
        self, lo: EditState, hi: EditState, extra: Mapping[str, bytes]
    ) -> tuple[np.ndarray, list[str]]:
        a, b = lo.current, hi.current
        empty = (np.zeros((0, int(self.encoder.dim)), dtype=np.float32), [])
        if a.image is None or b.image is None or a.image == b.image:
            return empty
        tsim = float(lo.vec.qtext.astype(np.float64) @ hi.vec.qtext.astype(np.float64))
        isim = float(lo.vec.ivec.astype(np.float64) @ hi.vec.ivec.astype(np.float64))
        if tsim >= self.config.hard_negative_max_text_sim or isim >= self.config.hard_negative_max_image_sim:
            # Paraphrased questions or same-subject images: a crossed input is then (nearly) the other
            # edit's own anchor, which already is a negative when the answers differ.
            return empty
        vecs = self._encode(
            [self._blob(a.image, extra), self._blob(b.image, extra)], [b.question, a.question]
        )
        return vecs, [
            f"image of edit {lo.id} + question of edit {hi.id}",
            f"image of edit {hi.id} + question of edit {lo.id}",
        ]
