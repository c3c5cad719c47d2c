"""The built-in real-pixel edit set, made from PyPI ``easy-vqa`` (MIT) held-out test pictures; fully offline.

Every easy-vqa picture shows one shape (circle, rectangle, triangle) of one colour (8), so a picture's
*subject* is its (shape, colour) pair. Questions fall into 13 *families* of paraphrases: what colour,
what shape, "is there a <colour> shape?" (8) and "is there a <shape>?" (3). One edit is
(test picture, family): "for this picture, this question now has that answer" (another colour or
shape; yes and no swapped). Its probes:

- reliability: the picture with the family's first phrasing; T-Gen: a paraphrase;
- I-Gen (image rephrasings): two *other* test pictures of the same subject, same question;
- T-Loc: a text-only question (no picture); M-Loc: a picture of another subject with a question
  of a family not edited on that subject;
- hard negatives: the same picture with another question (a family not edited on this subject:
  "other questions on the same image"), and the same question on a picture of another subject whose
  (subject, family) no edit covers.

Families are edited at most once per subject (so no two edits claim the same inputs): at most
24 x 13 = 312 edits. The locality pool is the shipped one (train-split pictures, generic questions).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..pretrained import EASYVQA_COLOURS, EASYVQA_SHAPES, derive_subjects, easyvqa_locality_pool
from .cases import EditCase, EvalDataset, Probe

__all__ = ["EASYVQA_MAX_EDITS", "easyvqa_dataset"]


@dataclass(frozen=True)
class _Family:
    name: str
    phrasings: tuple[str, ...]
    space: tuple[str, ...]
    truth_of: str  # "colour" | "shape" | "has:<colour or shape>"

    def truth(self, shape: str, colour: str) -> str:
        if self.truth_of == "colour":
            return colour
        if self.truth_of == "shape":
            return shape
        what = self.truth_of.split(":", 1)[1]
        return "yes" if what in (shape, colour) else "no"


def _families() -> list[_Family]:
    fams = [
        _Family(
            "colour",
            ("what color is the shape?", "what is the color of the shape?"),
            EASYVQA_COLOURS,
            "colour",
        ),
        _Family(
            "shape",
            ("what shape is in the image?", "what shape does the image contain?", "what shape is present?"),
            EASYVQA_SHAPES,
            "shape",
        ),
    ]
    for c in EASYVQA_COLOURS:
        fams.append(
            _Family(
                f"has-{c}",
                (
                    f"is there a {c} shape?",
                    f"does the image contain a {c} shape?",
                    f"is a {c} shape present?",
                ),
                ("yes", "no"),
                f"has:{c}",
            )
        )
    for s in EASYVQA_SHAPES:
        fams.append(
            _Family(
                f"has-{s}",
                (f"is there a {s}?", f"does the image contain a {s}?", f"is a {s} present?"),
                ("yes", "no"),
                f"has:{s}",
            )
        )
    return fams


EASYVQA_MAX_EDITS = 24 * 13


def _test_split() -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Test picture paths by (shape, colour) subject, and every test question (for T-Loc)."""
    try:
        import easy_vqa
    except ImportError:
        raise ConfigError("the easyvqa kind needs PyPI easy-vqa (pip install 'esg-memory[eval]')") from None
    qs, ans, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    by_subject: dict[tuple[str, str], list[str]] = defaultdict(list)
    for i, (shape, colour) in sorted(derive_subjects(qs, ans, ids).items()):
        if shape is not None and colour is not None:
            by_subject[(shape, colour)].append(str(paths[i]))
    return dict(by_subject), sorted(set(qs))


def _blind_answer(question: str) -> str:
    """A teacher-forcing target for a question asked without a picture (T-Loc): any well-formed answer
    does, since T-Loc compares the edited model's predictions with the pre-edit model's."""
    if question.split()[0] in ("is", "does"):
        return "yes"
    return "red" if "color" in question else "circle"


def easyvqa_dataset(n_edits: int, seed: int = 0) -> EvalDataset:
    """``n_edits`` (<= 312) edits on easy-vqa test pictures, in a seeded random order (module docstring)."""
    if not 1 <= int(n_edits) <= EASYVQA_MAX_EDITS:
        raise ConfigError(f"the easyvqa set holds 1..{EASYVQA_MAX_EDITS} edits, not {n_edits}")
    by_subject, questions = _test_split()
    fams = _families()
    rng = np.random.default_rng(seed)
    subjects = sorted(s for s, p in by_subject.items() if len(p) >= 4)
    pairs = [(s, f) for s in subjects for f in range(len(fams))]
    order = rng.permutation(len(pairs))[: int(n_edits)]
    chosen = [pairs[k] for k in order]
    edited = set(chosen)
    # a distinct picture per edit where the subject has enough, so one picture rarely carries two edits
    next_pic: dict[tuple[str, str], int] = defaultdict(int)
    cases = []
    for e, (subj, fi) in enumerate(chosen):
        fam = fams[fi]
        pics = by_subject[subj]
        k = next_pic[subj] % len(pics)
        next_pic[subj] += 1
        pic = pics[k]
        others = [p for p in pics if p != pic]
        shape, colour = subj
        truth = fam.truth(shape, colour)
        wrong = [a for a in fam.space if a != truth]
        target = str(wrong[int(rng.integers(len(wrong)))])
        q = fam.phrasings[0]
        free = [g for g in range(len(fams)) if (subj, g) not in edited]
        hard = []
        if free:
            g = fams[free[int(rng.integers(len(free)))]]
            hard.append(Probe("hard_same_image", pic, g.phrasings[0], g.truth(shape, colour)))
        far = [s for s in subjects if s != subj and (s, fi) not in edited]
        if far:
            s2 = far[int(rng.integers(len(far)))]
            p2 = by_subject[s2][-1]
            hard.append(Probe("hard_same_question", p2, q, fam.truth(*s2)))
        m_loc = None
        cands = [(s, g) for s in subjects if s != subj for g in range(len(fams)) if (s, g) not in edited]
        if cands:
            s3, g3 = cands[int(rng.integers(len(cands)))]
            m_loc = Probe("m_loc", by_subject[s3][-2], fams[g3].phrasings[0], fams[g3].truth(*s3))
        tq = questions[int(rng.integers(len(questions)))]
        cases.append(
            EditCase(
                uid=f"easyvqa:{e}",
                source="easy-vqa",
                image=pic,
                question=q,
                target=target,
                pred=truth,
                subject=f"{colour} {shape}",
                rephrase=fam.phrasings[1],
                image_rephrase=tuple(others[:2]),
                loc=Probe("t_loc", None, tq, _blind_answer(tq)),
                m_loc=m_loc,
                hard=tuple(hard),
                revisions=(*(a for a in wrong if a != target), truth),  # the last: "it was right"
            )
        )
    pool = [(str(p), t) for p, t in easyvqa_locality_pool()]
    return EvalDataset(
        "easyvqa", cases, "files", pool=pool, source="easy-vqa test split (PyPI easy-vqa, MIT)"
    )
