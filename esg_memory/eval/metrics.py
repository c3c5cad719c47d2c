"""Metric functions, EasyEdit-compatible where EasyEdit defines them (see docs/eval.md for the differences).

All scores come from :class:`ProbeOutput` records: one model run of one probe, teacher-forced on a
target (token predictions, ranked top-10 ids and a digest of the logits at the target positions)
plus its greedy generation. Each record carries the *stage* it was measured at: ``"pre"`` (the bare
model, before any edit exists, edits disabled) or ``"post"`` (the edited model). Locality and residue
take one of each and refuse anything else, so comparing the edited model with itself cannot happen.

- **token accuracy** (EasyEdit's Reliability / T-Gen / I-Gen / Portability): the share of target tokens
  the model predicts (argmax) under teacher forcing;
- **exact match**: the greedy generation equals the target after :func:`normalize_answer`;
- **T-Loc**: share of target positions whose top-1 token is unchanged vs the pre-edit model;
  **M-Loc**: share of (position, rank) cells of the ranked top-10 ids that are unchanged (EasyEdit's
  image-locality rule); both over the teacher-forced answer's positions;
- **scope audit** (ScopeEdit): each edit whose reliability probe succeeds is *correct* (generalizes,
  no leak), *under* (fails some generalization probe, no leak), *over* (generalizes, leaks) or *fail*
  (neither).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "AUDIT_CLASSES",
    "ProbeOutput",
    "exact_match",
    "locality",
    "mean_or_none",
    "normalize_answer",
    "residue",
    "scope_audit",
    "token_accuracy",
]

Stage = Literal["pre", "post"]
AUDIT_CLASSES = ("correct", "under", "over", "fail")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ProbeOutput:
    """What one run of one probe produced (immutable; compared, never recomputed)."""

    stage: Stage
    target_ids: tuple[int, ...]
    """Teacher-forced target token ids."""
    topk: tuple[tuple[int, ...], ...]
    """Per target position, the top-k token ids ranked by logit (k = 10 unless the vocabulary is smaller)."""
    text: str
    """Greedy generation (new tokens, special tokens dropped, stripped)."""
    digest: str
    """SHA-256 of the float32 logits at the target positions (bit-level identity)."""

    def __post_init__(self) -> None:
        if self.stage not in ("pre", "post"):
            raise InvalidInputError(f"stage must be 'pre' or 'post', not {self.stage!r}")
        if len(self.topk) != len(self.target_ids):
            raise InvalidInputError("topk needs one row per target token")

    @property
    def argmax(self) -> tuple[int, ...]:
        return tuple(row[0] for row in self.topk)


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding whitespace and a trailing full stop removed."""
    return _SPACE.sub(" ", text).strip().lower().rstrip(".").strip()


def token_accuracy(out: ProbeOutput) -> float:
    """Share of target tokens predicted (argmax under teacher forcing)."""
    if not out.target_ids:
        raise InvalidInputError("empty target")
    return float(np.mean([a == t for a, t in zip(out.argmax, out.target_ids, strict=True)]))


def exact_match(out: ProbeOutput, target: str) -> bool:
    """Whether the greedy generation is the target (after :func:`normalize_answer`)."""
    return normalize_answer(out.text) == normalize_answer(target)


def _pre_post(pre: ProbeOutput, post: ProbeOutput) -> None:
    if not isinstance(pre, ProbeOutput) or not isinstance(post, ProbeOutput):
        raise InvalidInputError("locality compares two ProbeOutput records")
    if pre.stage != "pre" or post.stage != "post":
        raise InvalidInputError(
            f"locality compares a pre-edit output with a post-edit one, got {pre.stage!r} and {post.stage!r}"
        )
    if pre.target_ids != post.target_ids:
        raise InvalidInputError("pre and post outputs were teacher-forced on different targets")


def locality(pre: ProbeOutput, post: ProbeOutput, k: int = 1) -> float:
    """Share of (target position, rank < k) cells whose token id is unchanged from the pre-edit model.

    ``k=1``: EasyEdit's T-Loc; ``k=10``: its M-Loc (ranked top-10 compared position by position).
    """
    _pre_post(pre, post)
    kk = min(k, len(pre.topk[0]), len(post.topk[0]))
    if kk < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    a = np.asarray([r[:kk] for r in pre.topk])
    b = np.asarray([r[:kk] for r in post.topk])
    return float((a == b).mean())


def residue(pre: ProbeOutput, post: ProbeOutput) -> dict[str, bool]:
    """How a post-edit output differs from the pre-edit one: generated text, top-1 tokens, top-10, bits."""
    _pre_post(pre, post)
    return {
        "text": normalize_answer(pre.text) != normalize_answer(post.text),
        "tokens": pre.argmax != post.argmax,
        "top10": pre.topk != post.topk,
        "bits": pre.digest != post.digest,
    }


def mean_or_none(values: Sequence[float | bool]) -> float | None:
    """Mean, or None when there is nothing to average (a metric the data does not define)."""
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else None


def scope_audit(
    reliable: Sequence[bool], generalizes: Sequence[bool], leaks: Sequence[bool]
) -> dict[str, float | int | None]:
    """ScopeEdit's four shares among *successful* edits (reliability probe answered), plus their count.

    ``generalizes[i]``: every generalization probe of edit i gives the new answer; ``leaks[i]``: some
    locality probe built from edit i changed vs the pre-edit model.
    """
    r, g, lk = (np.asarray(x, dtype=bool) for x in (reliable, generalizes, leaks))
    if not (r.shape == g.shape == lk.shape):
        raise InvalidInputError("reliable, generalizes and leaks need one entry per edit")
    n = int(r.sum())
    cls = {"correct": g & ~lk, "under": ~g & ~lk, "over": g & lk, "fail": ~g & lk}
    out: dict[str, float | int | None] = {k: (float(v[r].mean()) if n else None) for k, v in cls.items()}
    out["n_successful"] = n
    return out
