"""`EditEncoder`: turning an edit's own inputs, the locality pool and cross hard negatives into keys.

Everything here is a function of one edit's content (plus the pool and config), or of one *pair*
of edits for the cross negatives: which rows are encoded never depends on other edits, and this is
what keeps scopes independent of arrival order (and deletion exact). A bulk add encodes the rows
of many edits in the same encoder calls (`EditEncoder.versions`): exact for an encoder that
computes each row on its own; a model whose float results vary with the batch (open_clip on the
CPU, ~1e-7, as its embedding cache already makes them vary with what was encoded before) gives
vectors equal to that precision.
Images are looked up by sha256 through a ``blob`` callable: the plan's new images first, then the
memory's committed store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Rows:
    """One version's encoder rows chosen before anything is encoded (see `EditEncoder.versions`)."""

    v: EditVersion
    img: bytes | None  # the version's image bytes
    rows: list[tuple[Any, str | None]]  # candidates: (image, text)
    labels: list[str]
    fb_neg: list[tuple[Any, str | None]]  # feedback negatives (the last own-negative rows)


class EditEncoder:
    """The memory's key encoder applied to edits: a function of content, config and the pool only."""

    #: Most encoder rows one call of a bulk encode (`versions`) gets; a version is never split.
    rows_per_call = 1024

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
        return next(self.versions([v], blob, pool))

    def versions(
        self, vs: Sequence[EditVersion], blob: BlobLookup, pool: LocalityPool
    ) -> Iterator[EditVectors]:
        """`version` of each of ``vs``, in order, encoded together (a bulk add's vectors).

        Consecutive versions are grouped into chunks of at most `rows_per_call` encoder rows (a
        version is never split), and each chunk takes three encoder calls — its questions and the
        generic questions as text-only keys, its images as image-only keys, then every row of every
        version in it — instead of three per version; an encoder batches its model passes within a
        call (`CachedTowers.batch_size`). Each row is the same input as `version` gives it, so an
        encoder that computes every row on its own gives the same vectors bit for bit; a model whose
        float results depend on the batch (open_clip on the CPU: last-bit differences, ~1e-7) gives
        vectors equal to that precision. Chunks are encoded lazily, as the vectors are consumed.
        """
        chunk: list[_Rows] = []
        size = 0
        for v in vs:
            rows = self._own_rows(v, blob)
            n = len(rows.rows) + len(rows.fb_neg) + self._max_negatives(v, pool)
            if chunk and size + n > self.rows_per_call:
                yield from self._encode_chunk(chunk, blob, pool)
                chunk, size = [], 0
            chunk.append(rows)
            size += n
        if chunk:
            yield from self._encode_chunk(chunk, blob, pool)

    def _max_negatives(self, v: EditVersion, pool: LocalityPool) -> int:
        """The most generic / pool hard-negative rows ``v`` can get (only an edit with an image has them)."""
        if v.image is None:
            return 0
        return min(self.config.n_generic_questions, len(GENERIC_QUESTIONS)) + len(pool.images)

    def _own_rows(self, v: EditVersion, blob: BlobLookup) -> _Rows:
        """The candidate rows of ``v`` (anchor, user positives, templates, augmentations, feedback
        positives) and its feedback negatives: everything that needs no encoding to be chosen."""
        cfg = self.config
        img = None if v.image is None else blob(v.image)
        q = v.question
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
        for j, f in enumerate(f for f in v.feedback if f.kind == "positive"):
            rows.append((None if f.image is None else blob(f.image), f.text))
            labels.append(f"feedback {j}")
        fb_neg = [
            (None if f.image is None else blob(f.image), f.text) for f in v.feedback if f.kind == "negative"
        ]
        return _Rows(v, img, rows, labels, fb_neg)

    def _encode_chunk(
        self, chunk: list[_Rows], blob: BlobLookup, pool: LocalityPool
    ) -> Iterator[EditVectors]:
        cfg = self.config
        # questions first: a one-version chunk makes the very calls one `version` always made
        texts = list(dict.fromkeys([*(r.v.question for r in chunk), *GENERIC_QUESTIONS]))
        tvecs = check_keys(self.encoder.encode_texts(texts), len(texts), self.dim, "encoder text output")
        text_at = {t: i for i, t in enumerate(texts)}
        generic = tvecs[[text_at[g] for g in GENERIC_QUESTIONS]].astype(np.float64)
        shas = list(dict.fromkeys(r.v.image for r in chunk if r.v.image is not None))
        ivecs = self.image_vecs([blob(s) for s in shas])
        image_at = {s: i for i, s in enumerate(shas)}
        rows: list[tuple[Any, str | None]] = []
        spans: list[tuple[_Rows, np.ndarray, np.ndarray, list[str], int, int]] = []
        for r in chunk:
            v, img, q = r.v, r.img, r.v.question
            qtext = tvecs[text_at[q]]
            ivec = ivecs[image_at[v.image]] if v.image is not None else np.zeros(self.dim, np.float32)
            neg_rows: list[tuple[Any, str | None]] = []
            neg_labels: list[str] = []
            if img is not None:
                sims = generic @ qtext.astype(np.float64)
                picked = [
                    g
                    for g, s in zip(GENERIC_QUESTIONS, sims, strict=True)
                    if s < cfg.hard_negative_max_text_sim
                ][: cfg.n_generic_questions]
                for g in picked:
                    neg_rows.append((img, g))
                    neg_labels.append(f"same image, generic question {g!r}")
                isims = pool.image_vecs.astype(np.float64) @ ivec.astype(np.float64)
                for j, sha in enumerate(pool.images):
                    # A pool image this close to the edit's own shows the same subject: not "another image".
                    if sha != v.image and isims[j] < cfg.hard_negative_max_image_sim:
                        neg_rows.append((blob(sha), q))
                        neg_labels.append(f"same question, locality image {j}")
            neg_labels.extend(f"feedback-negative {j}" for j in range(len(r.fb_neg)))
            start = len(rows)
            rows.extend(r.rows)
            rows.extend(neg_rows)
            rows.extend(r.fb_neg)
            spans.append((r, qtext, ivec, neg_labels, start, len(rows)))
        keys = self.keys([row[0] for row in rows], [row[1] for row in rows])
        for r, qtext, ivec, neg_labels, start, end in spans:
            n_cand = len(r.rows)
            own = keys[start:end].copy()  # each edit's own arrays: none keeps the chunk's alive
            yield EditVectors(
                cand=own[:n_cand],
                cand_labels=tuple(r.labels),
                own_neg=own[n_cand:],
                own_neg_labels=tuple(neg_labels),
                qtext=qtext.copy(),
                ivec=ivec.copy(),
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
