"""Edit streams of the scenes world, planned symbolically: which edits, which probes, and a check that no
probe a locality metric counts is covered by any edit of the stream.

A planned edit is "for this rendering of this subject, this family's question now has that answer"; it
legitimately covers every rendering of its subject and every phrasing of its family (``scope="subject"``),
nothing else. Its probes:

=======================  ==========================================================================
``reliability``          the edit input: the edit rendering (train nuisance) and a train phrasing
``t_gen``                the edit rendering, a held-out phrasing of the family
``i_gen``                a held-out-nuisance rendering of the subject, the edit phrasing
``i_t_gen``              a held-out rendering with a held-out phrasing
``m_loc``                a test-split subject (never trained or calibrated on), one of its families
``hard_same_image``      the edit rendering, another family of the subject (another fact)
``hard_same_question``   the edit family's train phrasing on another subject's rendering
``t_loc``                a text-only question the scenes never answer
=======================  ==========================================================================

Nothing is rendered here: probes name (subject, family, phrasing, rendering), and `check_stream` proves
on those names alone that every locality and hard-negative probe is outside every edit's scope.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scenes import ScenesWorld, Subject

__all__ = [
    "GEN_KINDS",
    "LOC_KINDS",
    "TEXT_LOCALITY",
    "PlannedEdit",
    "PlannedProbe",
    "check_stream",
    "plan_stream",
]

GEN_KINDS = ("reliability", "t_gen", "i_gen", "i_t_gen")
LOC_KINDS = ("m_loc", "hard_same_image", "hard_same_question", "t_loc")

#: Text-only locality questions: nothing about a picture, so no edit of the world may change them.
TEXT_LOCALITY: tuple[str, ...] = (
    "what is the capital of france?",
    "how many days are in a week?",
    "who wrote romeo and juliet?",
    "what is two plus three?",
    "which planet is closest to the sun?",
    "what language is spoken in brazil?",
)


@dataclass(frozen=True)
class PlannedProbe:
    """One probe by name: ``subject`` -1 and ``family`` "" for a text-only probe (``text`` set)."""

    kind: str
    subject: int
    family: str
    phrasing: tuple[str, int]  # (train | held_out, index into the family's phrasings)
    rendering: tuple[str, int] | None  # (train | held_out, index), None: no picture
    text: str | None = None


@dataclass(frozen=True)
class PlannedEdit:
    subject: int
    family: str
    phrasing: int  # index into the family's train phrasings
    rendering: int  # index of the train-nuisance rendering
    new_answer: str
    probes: tuple[PlannedProbe, ...]


def plan_stream(world: ScenesWorld, n_edits: int, seed: int = 0) -> list[PlannedEdit]:
    """``n_edits`` distinct edits on trained-on subjects, each with its probes (see the module docstring).

    Locality probes are drawn only from (subject, family) pairs no edit of the stream covers, so a
    later edit can never make an earlier edit's locality probe a legitimate target.
    """
    rng = random.Random(seed)
    subjects = world.subjects
    train = [s for s in subjects if not world.is_held_out(s)]
    held = [s for s in subjects if world.subject_split(s) == "test"]
    space = [(s.id, f.name) for s in train for f in world.families(s)]
    if n_edits > len(space):
        raise ValueError(f"the world has {len(space)} editable pairs, fewer than {n_edits}")
    chosen = rng.sample(space, n_edits)
    edited = set(chosen)
    by_objects: dict[int, list[Subject]] = {1: [], 2: []}
    for s in train:
        by_objects[len(s.objects)].append(s)
    out = []
    for sid, fname in chosen:
        s = subjects[sid]
        n = len(s.objects)
        f = world.family(s, fname)
        ph = rng.randrange(len(f.train))
        rd = rng.randrange(1000)
        new = rng.choice(s.alternatives(f))
        probes = [
            PlannedProbe("reliability", sid, fname, ("train", ph), ("train", rd)),
            PlannedProbe("t_gen", sid, fname, ("held_out", rng.randrange(len(f.held_out))), ("train", rd)),
            PlannedProbe("i_gen", sid, fname, ("train", ph), ("held_out", rng.randrange(1000))),
            PlannedProbe(
                "i_t_gen",
                sid,
                fname,
                ("held_out", rng.randrange(len(f.held_out))),
                ("held_out", rng.randrange(1000)),
            ),
        ]
        others = [g for g in world.families(s) if g.name != fname and (sid, g.name) not in edited]
        if others:
            g = rng.choice(others)
            probes.append(
                PlannedProbe(
                    "hard_same_image", sid, g.name, ("train", rng.randrange(len(g.train))), ("train", rd)
                )
            )
        for _ in range(20):  # another subject of the same layout, its pair with this family not edited
            o = rng.choice(by_objects[n])
            if o.id != sid and (o.id, fname) not in edited and o.answer(f) != new:
                probes.append(
                    PlannedProbe(
                        "hard_same_question", o.id, fname, ("train", ph), ("train", rng.randrange(1000))
                    )
                )
                break
        h = rng.choice(held)
        g = rng.choice(world.families(h))
        probes.append(
            PlannedProbe(
                "m_loc", h.id, g.name, ("train", rng.randrange(len(g.train))), ("train", rng.randrange(1000))
            )
        )
        probes.append(PlannedProbe("t_loc", -1, "", ("train", 0), None, text=rng.choice(TEXT_LOCALITY)))
        out.append(PlannedEdit(sid, fname, ph, rd, new, tuple(probes)))
    return out


def check_stream(world: ScenesWorld, plan: list[PlannedEdit]) -> list[str]:
    """Problems of a planned stream, found symbolically (empty: valid). Checks that edits are distinct
    and on trained-on subjects; every probe names a real subject, family, phrasing and rendering split;
    generalization probes ask their own edit's (subject, family) with held-out phrasings / renderings
    where their kind says; and no locality or hard-negative probe asks a (subject, family) any edit of
    the stream covers (m_loc ones only about held-out subjects)."""
    problems: list[str] = []
    subjects = world.subjects
    edited = {(e.subject, e.family) for e in plan}
    if len(edited) != len(plan):
        problems.append(f"{len(plan) - len(edited)} edits repeat a (subject, family) pair")
    need = {
        "reliability": ("train", "train"),
        "t_gen": ("held_out", "train"),
        "i_gen": ("train", "held_out"),
        "i_t_gen": ("held_out", "held_out"),
    }
    for i, e in enumerate(plan):
        s = subjects[e.subject]
        if world.is_held_out(s):
            problems.append(f"edit {i}: subject {e.subject} is held out")
        fam = world.family(s, e.family)
        if fam is None or e.new_answer == s.answer(fam):
            problems.append(f"edit {i}: bad family or an answer that changes nothing")
        kinds = [p.kind for p in e.probes]
        for k in ("reliability", "t_gen", "i_gen", "m_loc", "t_loc"):
            if k not in kinds:
                problems.append(f"edit {i}: no {k} probe")
        for p in e.probes:
            if p.kind == "t_loc":
                if p.subject != -1 or p.rendering is not None or not p.text:
                    problems.append(f"edit {i}: a t_loc probe must be text only")
                continue
            ps = subjects[p.subject]
            pf = world.family(ps, p.family)
            if pf is None:
                problems.append(f"edit {i}: probe {p.kind} names family {p.family!r} of no such subject")
                continue
            split, idx = p.phrasing
            if not 0 <= idx < len(getattr(pf, split)):
                problems.append(f"edit {i}: probe {p.kind} phrasing {p.phrasing} out of range")
            if p.kind in need:
                if (p.subject, p.family) != (e.subject, e.family):
                    problems.append(f"edit {i}: {p.kind} probe asks another edit's pair")
                if (p.phrasing[0], p.rendering[0] if p.rendering else None) != need[p.kind]:
                    problems.append(f"edit {i}: {p.kind} probe uses the wrong phrasing / rendering split")
            elif (p.subject, p.family) in edited:
                problems.append(f"edit {i}: {p.kind} probe ({p.subject}, {p.family}) is covered by an edit")
            if p.kind == "m_loc" and world.subject_split(ps) != "test":
                problems.append(f"edit {i}: m_loc probe on a subject outside the test split")
            if p.kind == "hard_same_image" and p.subject != e.subject:
                problems.append(f"edit {i}: hard_same_image probe on another subject")
            if p.kind == "hard_same_question" and (p.subject == e.subject or p.family != e.family):
                problems.append(
                    f"edit {i}: hard_same_question probe must ask the same family of another subject"
                )
    return problems
