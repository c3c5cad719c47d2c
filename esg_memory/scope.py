"""Learning an edit's scope: which keys it owns and each key's cosine threshold. Pure numpy.

The fit sees only similarity matrices, never vectors or the rest of the memory, so it is a
deterministic function of (the edit's candidates, its negatives, the config):

* candidates: row 0 is the anchor (the edit's own image+question key), the others are positives
  (user rephrasings/images, generated ones, feedback) that should route to the edit;
* negatives: inputs that must not route to it (neighbour edits with other answers, the locality
  pool, hard negatives such as the same image with another question).

Rule for a key ``k``: ``t = max(hardest_negative(k) + margin, min_threshold)``, moved up by
``placement`` into the free interval below the easiest covered positive, capped at
``max_threshold``. Positives the anchor's ball cannot cover without admitting a negative are not
reached by widening: the fit greedily adds them as extra keys (each with its own threshold, each
ball again clear of every negative), and records why any positive stays uncovered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import MemoryConfig
from .errors import InvalidInputError
from .types import ScopeRecord, UncoveredPositive

__all__ = ["DEFAULT_LOCALITY_TEXTS", "GENERIC_QUESTIONS", "ScopeFit", "fit_scope", "pairwise_sims"]

#: Questions that could be asked about almost any image: "same image, other question" hard negatives.
GENERIC_QUESTIONS: tuple[str, ...] = (
    "What color is the object on the left?",
    "How many people are in the picture?",
    "What is in the background?",
    "Is it raining in this photo?",
    "What time of day is it?",
    "Is this indoors or outdoors?",
    "What is the man holding?",
    "What material is the table made of?",
    "Is there a dog in the image?",
    "What brand is shown?",
    "What is written on the sign?",
    "Describe the weather.",
)

#: Unrelated inputs used as negatives when the user gives no locality pool of their own.
DEFAULT_LOCALITY_TEXTS: tuple[str, ...] = (
    "Who wrote the novel Pride and Prejudice?",
    "What is the boiling point of water at sea level?",
    "When did the Second World War end?",
    "What is the capital of Australia?",
    "How many legs does a spider have?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is the largest planet in the solar system?",
    "Which element has the chemical symbol Fe?",
    "Who was the first person to walk on the moon?",
    "What language is spoken in Brazil?",
    "How long is a marathon?",
    "What is the square root of 144?",
    "Which ocean lies between Africa and Australia?",
    "Who composed the Four Seasons?",
    "What year did the Berlin Wall fall?",
    "What is photosynthesis?",
    "Name a famous play by William Shakespeare.",
    "What currency is used in Japan?",
    "How many players are on a football team?",
    "What is the tallest mountain in the world?",
    "Who discovered penicillin?",
    "What is the freezing point of water in Fahrenheit?",
    "Which country hosted the 2016 Summer Olympics?",
    "What is the main ingredient of guacamole?",
    "Translate 'thank you' into French.",
    "Write a haiku about autumn.",
    "What does DNA stand for?",
    "How do airplanes stay in the air?",
    "Recommend a good book for a long flight.",
    "What is the speed of light?",
    "Who invented the telephone?",
    "Summarize the plot of Hamlet in one sentence.",
)


def pairwise_sims(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines between unit rows of ``a`` and ``b`` in float64.

    Callers compute one block per (edit, edit) pair so each entry is always produced by the same
    shapes: the value then never depends on how many other edits exist, which exact deletion needs.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if a64.ndim != 2 or b64.ndim != 2 or a64.shape[1] != b64.shape[1]:
        raise InvalidInputError(f"similarity of shapes {a64.shape} and {b64.shape}")
    if a64.shape[0] == 0 or b64.shape[0] == 0:
        return np.zeros((a64.shape[0], b64.shape[0]), dtype=np.float64)
    return a64 @ b64.T


@dataclass(frozen=True)
class ScopeFit:
    """The result of a fit: which candidates became keys, their thresholds, and why."""

    key_index: tuple[int, ...]
    thresholds: np.ndarray  # (n_keys,) float32
    records: tuple[ScopeRecord, ...]
    uncovered: tuple[UncoveredPositive, ...]

    def same_as(self, other: ScopeFit) -> bool:
        return self.key_index == other.key_index and np.array_equal(self.thresholds, other.thresholds)


def _as_matrix(x: np.ndarray, rows: int | None, cols: int | None, what: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim != 2 or (rows is not None and m.shape[0] != rows) or (cols is not None and m.shape[1] != cols):
        raise InvalidInputError(f"{what} has shape {m.shape}, expected ({rows}, {cols})")
    if not np.all(np.isfinite(m)):
        raise InvalidInputError(f"{what} contains NaN or inf")
    return m


def fit_scope(
    cand_sims: np.ndarray,
    neg_sims: np.ndarray,
    cand_labels: list[str],
    neg_labels: list[str],
    config: MemoryConfig,
) -> ScopeFit:
    """Fit one edit's keys and thresholds.

    ``cand_sims``: (c, c) cosines among candidates, row/column 0 = the anchor.
    ``neg_sims``: (c, q) cosines from each candidate to each negative.
    Labels name candidates/negatives in the records. Returns a `ScopeFit`; the anchor is always key 0.
    """
    c = len(cand_labels)
    if c < 1:
        raise InvalidInputError("a scope needs at least the anchor candidate")
    cc = _as_matrix(cand_sims, c, c, "cand_sims")
    q = len(neg_labels)
    cn = _as_matrix(neg_sims, c, q, "neg_sims")
    m, lo_floor, hi_cap = float(config.margin), float(config.min_threshold), float(config.max_threshold)

    if q:
        hard_idx = np.argmax(cn, axis=1)
        hard = cn[np.arange(c), hard_idx]
    else:
        hard_idx = np.zeros(c, dtype=np.int64)
        hard = np.full(c, -np.inf)
    lowest = np.maximum(hard + m, lo_floor)
    # A candidate whose nearest negative sits within the margin of itself cannot own a ball that
    # covers it and excludes that negative: it may be covered by another key, never become one.
    unsafe = lowest > hi_cap

    def place(i: int) -> tuple[float, np.ndarray]:
        t = min(float(lowest[i]), hi_cap)
        covered = cc[i] >= t
        covered[i] = True
        others = covered.copy()
        others[i] = False
        if config.placement > 0.0 and others.any():
            ep = float(cc[i, others].min())
            t = min(t + config.placement * max(0.0, ep - m - t), hi_cap)
            covered = cc[i] >= t
            covered[i] = True
        return t, covered

    keys: list[int] = []
    thresholds: list[float] = []
    records: list[ScopeRecord] = []
    covered_any = np.zeros(c, dtype=bool)

    def add_key(i: int) -> None:
        t, covered = place(i)
        others = covered.copy()
        others[i] = False
        hn = float(hard[i]) if q else None
        src = neg_labels[int(hard_idx[i])] if q else None
        ep = float(cc[i, others].min()) if others.any() else None
        if unsafe[i]:
            reason = (
                f"capped at max_threshold {hi_cap}: negative {src} at {hn:.4f} is within the margin "
                "of this key (unseparable; listed by conflicts())"
            )
        elif q and hn + m >= lo_floor:
            reason = f"margin {m} above the hardest negative ({src}, {hn:.4f})"
        else:
            reason = f"min_threshold floor {lo_floor}: no negative within {m} of it"
        if t > float(lowest[i]) + 1e-12 and not unsafe[i]:
            reason += f"; raised by placement {config.placement} toward the easiest positive"
        keys.append(i)
        thresholds.append(t)
        records.append(
            ScopeRecord(
                origin=cand_labels[i],
                threshold=float(np.float32(t)),
                hardest_negative=hn,
                hardest_negative_source=src,
                easiest_positive=ep,
                margin=float(t - hn) if q else float(t - lo_floor),
                covers=int(others.sum()),
                reason=reason,
            )
        )
        covered_any[covered] = True

    add_key(0)
    while len(keys) < config.max_keys:
        todo = np.flatnonzero(~covered_any)
        options = [int(i) for i in todo if not unsafe[i]]
        if not options:
            break
        # Greedy set cover: the uncovered positive whose own safe ball covers the most uncovered
        # positives; ties go to the lowest index, so the result depends only on the inputs.
        gains = [int(np.count_nonzero(place(i)[1] & ~covered_any)) for i in options]
        add_key(options[int(np.argmax(gains))])

    uncovered: list[UncoveredPositive] = []
    for i in np.flatnonzero(~covered_any):
        i = int(i)
        if unsafe[i]:
            why = (
                f"negative {neg_labels[int(hard_idx[i])]} at {float(hard[i]):.4f} lies within the margin; "
                "covering it would admit that negative"
            )
        else:
            why = f"max_keys={config.max_keys} reached"
        uncovered.append(UncoveredPositive(origin=cand_labels[i], reason=why))
    return ScopeFit(
        key_index=tuple(keys),
        thresholds=np.asarray(thresholds, dtype=np.float32),
        records=tuple(records),
        uncovered=tuple(uncovered),
    )
