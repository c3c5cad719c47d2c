"""The scenes world: subjects, question families with paraphrases, and the splits generalization needs.

A *subject* is a scene's identity — one or two objects, each with a shape, colour, pattern and size,
in a left-to-right order; a *rendering* of a subject varies only nuisance factors (`render.Nuisance`).
A *question family* asks one thing about a subject ("the colour of the left object"); its answer is a
function of the subject alone, every phrasing of the family asks the same thing, and no two families ask
the same thing (so "same picture, another question" is always another fact).

Splits (all deterministic, documented in docs/worlds.md):

- **phrasings**: each family's phrasings are split into ``train`` (what models may be trained and
  adapters tuned on) and ``held_out`` (T-Gen probes: nothing is trained, tuned or calibrated on them);
- **nuisance**: held-out values lie between trained ones or are kinds training never draws.
  ``train`` renderings: rotations whose angle mod 90° is outside [35°, 55°), scales 0.8-0.85, 0.9-1.1,
  1.15-1.2, noise 0-8 or 14-18, light 0.7-0.78, 0.85-1.1 or 1.2-1.3, blur in 30%, plain / gradient /
  grid / dots / checks backgrounds in nine tints; ``held_out`` renderings (I-Gen probes): angle mod 90°
  in [40°, 50°), scale 0.85-0.9 or 1.1-1.15, noise 9-13, light 0.78-0.85 or 1.1-1.2, always a blur,
  noise / stripes backgrounds in three other tints. Shifts (±10%) are alike in both;
- **subjects**: about one subject in five (by a hash of its id) is ``held_out``: never in model
  training, the source of locality probes on unseen scenes.

Sizes: 640 one-object subjects and `N_PAIRS` two-object subjects; 6 families per one-object subject and
9 per two-object subject: 61,440 (subject, family) pairs, each a possible edit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .render import COLOURS, PATTERNS, RENDER_VERSION, SHAPES, SIZES, Nuisance, SceneObject, render

__all__ = [
    "FAMILIES",
    "N_PAIRS",
    "WORLD_VERSION",
    "Family",
    "ScenesWorld",
    "Subject",
]

#: Bump when subjects, families, phrasings, splits or answers change (saved results record it).
WORLD_VERSION = 3
#: Two-object subjects drawn (deterministically) from the 640 x 639 ordered pairs.
N_PAIRS = 6400

_ONE = [SceneObject(s, c, p, z) for s in SHAPES for c in COLOURS for p in PATTERNS for z in SIZES]


@dataclass(frozen=True)
class Family:
    """A question family: what it asks (``attr`` of object ``obj``, a count or a yes/no) and its
    phrasings, split into ``train`` and ``held_out``."""

    name: str
    kind: str  # attribute | count | yesno
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    attr: str | None = None  # shape | colour | pattern | size
    obj: int | None = None  # 0 = the (left) object, 1 = the right one


def _attr_family(
    name: str, attr: str, obj: int | None, train: tuple[str, ...], held: tuple[str, ...]
) -> Family:
    return Family(name, "attribute", train, held, attr=attr, obj=obj)


_WHERE = {None: "the", 0: "the left", 1: "the right"}


def _attr_phrasings(attr: str, obj: int | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    w = _WHERE[obj]
    thing = "shape" if obj is None else "object"
    if attr == "colour":
        return (
            (
                f"what color is {w} {thing}?",
                f"what is the color of {w} {thing}?",
                f"which color is {w} {thing}?",
                f"what colour is {w} {thing}?",
                f"tell me the color of {w} {thing}.",
            ),
            (
                f"{w} {thing} is painted in which hue?",
                f"name the colour {w} {thing} has.",
                f"what hue does {w} {thing} show?",
            ),
        )
    if attr == "shape":
        return (
            (
                f"what shape is {w} {thing}?",
                f"what is the shape of {w} {thing}?",
                f"which shape is {w} {thing}?",
                f"what kind of shape is {w} {thing}?",
                f"tell me the shape of {w} {thing}.",
            ),
            (
                f"{w} {thing} has which outline?",
                f"name the geometric form of {w} {thing}.",
                f"what figure is {w} {thing} drawn as?",
            ),
        )
    if attr == "pattern":
        return (
            (
                f"what pattern does {w} {thing} have?",
                f"what is the pattern of {w} {thing}?",
                f"which pattern is on {w} {thing}?",
                f"how is {w} {thing} patterned?",
            ),
            (f"what texture covers {w} {thing}?", f"describe the fill of {w} {thing} in one word."),
        )
    if attr == "size":
        return (
            (
                f"what size is {w} {thing}?",
                f"is {w} {thing} small or large?",
                f"how big is {w} {thing}?",
                f"what is the size of {w} {thing}?",
            ),
            (f"would you call {w} {thing} small or large?", f"how large is {w} {thing}, small or large?"),
        )
    raise ValueError(attr)


def _families(n_objects: int) -> tuple[Family, ...]:
    out = []
    objs = (None,) if n_objects == 1 else (0, 1)
    attrs = ("shape", "colour", "pattern", "size") if n_objects == 1 else ("shape", "colour", "pattern")
    for o in objs:
        for a in attrs:
            tr, ho = _attr_phrasings(a, o)
            out.append(
                _attr_family(f"{a}" if o is None else f"{a}_{'left' if o == 0 else 'right'}", a, o, tr, ho)
            )
    out.append(
        Family(
            "count",
            "count",
            (
                "how many objects are there?",
                "how many shapes are in the image?",
                "what is the number of objects?",
                "count the objects in the picture.",
            ),
            ("how many figures can you see?", "what number of things are drawn here?"),
        )
    )
    if n_objects == 1:
        out.append(
            Family(
                "yesno_round",
                "yesno",
                ("is the shape round?", "is the object round?", "does the shape have no corners?"),
                ("is the figure curved all the way around?", "would you call the object round?"),
                attr="shape",
                obj=0,
            )
        )
    else:
        out.append(
            Family(
                "yesno_same_shape",
                "yesno",
                (
                    "are both objects the same shape?",
                    "do the two objects have the same shape?",
                    "is the shape of both objects equal?",
                ),
                ("do the figures share one outline?", "are the two things drawn as the same figure?"),
            )
        )
        out.append(
            Family(
                "yesno_same_colour",
                "yesno",
                (
                    "are both objects the same color?",
                    "do the two shapes have the same color?",
                    "is the color of both objects equal?",
                ),
                ("do the figures share one hue?", "are the two objects painted alike?"),
            )
        )
    return tuple(out)


#: Families of a one-object subject, then of a two-object subject.
FAMILIES: dict[int, tuple[Family, ...]] = {1: _families(1), 2: _families(2)}
_BY_NAME: dict[int, dict[str, Family]] = {n: {f.name: f for f in fs} for n, fs in FAMILIES.items()}
_ROUND = frozenset({"circle", "ring"})
_NUMBERS = {1: "one", 2: "two"}


@dataclass(frozen=True)
class Subject:
    """A scene's identity: its objects, left to right, and its id in the world."""

    id: int
    objects: tuple[SceneObject, ...]

    def answer(self, family: Family) -> str:
        """What ``family`` answers about this subject (a function of the subject alone)."""
        if family.kind == "attribute":
            ob = self.objects[family.obj or 0]
            return getattr(ob, family.attr)
        if family.kind == "count":
            return _NUMBERS[len(self.objects)]
        if family.name == "yesno_round":
            return "yes" if self.objects[0].shape in _ROUND else "no"
        if family.name == "yesno_same_shape":
            return "yes" if self.objects[0].shape == self.objects[1].shape else "no"
        if family.name == "yesno_same_colour":
            return "yes" if self.objects[0].colour == self.objects[1].colour else "no"
        raise ValueError(family.name)

    def alternatives(self, family: Family) -> tuple[str, ...]:
        """Every other answer of the family's kind: what an edit may change the answer to."""
        if family.kind == "attribute":
            attr = family.attr
            pool = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": tuple(SIZES)}[
                attr
            ]
        elif family.kind == "count":
            pool = ("one", "two", "three", "four")
        else:
            pool = ("yes", "no")
        return tuple(a for a in pool if a != self.answer(family))


# Nuisance ranges (see `ScenesWorld.nuisance`). Sizes stay answerable under every scale: the largest
# small object (0.5 x 1.2) stays below the smallest large one (0.85 x 0.8).
_TRAIN_ANGLE = ((0.0, 35.0), (55.0, 90.0))
_TRAIN_SCALE = ((0.8, 0.85), (0.9, 1.1), (1.15, 1.2))
_HELD_SCALE = ((0.85, 0.9), (1.1, 1.15))
_TRAIN_NOISE = ((0.0, 8.0), (14.0, 18.0))
_TRAIN_LIGHT = ((0.7, 0.78), (0.85, 1.1), (1.2, 1.3))
_HELD_LIGHT = ((0.78, 0.85), (1.1, 1.2))
_TRAIN_BACKGROUNDS = ("plain", "gradient", "grid", "dots", "checks")
_TRAIN_TINTS = (
    (250, 250, 250), (245, 240, 225), (230, 240, 250), (235, 250, 235), (250, 235, 235), (240, 235, 250),
    (250, 250, 220), (225, 245, 245), (220, 220, 220),
)
_HELD_TINTS = ((215, 235, 215), (240, 215, 215), (225, 225, 240))


def _bands(u: float, bands: tuple[tuple[float, float], ...]) -> float:
    """``u`` in [0, 1) mapped uniformly onto the union of ``bands`` (by length)."""
    x = u * sum(b - a for a, b in bands)
    for a, b in bands:
        if x < b - a:
            return a + x
        x -= b - a
    return bands[-1][1]


def _unit(*parts: object) -> float:
    """A number in [0, 1) from the world version and ``parts`` (stable across runs and machines)."""
    h = hashlib.sha256("\x00".join(map(str, (WORLD_VERSION, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


class ScenesWorld:
    """All subjects, families and renderings of the world (see the module docstring)."""

    version = WORLD_VERSION
    render_version = RENDER_VERSION

    @cached_property
    def subjects(self) -> tuple[Subject, ...]:
        rng = np.random.default_rng(20261201)
        pairs: set[tuple[int, int]] = set()
        n = len(_ONE)
        while len(pairs) < N_PAIRS:
            a, b = (int(x) for x in rng.integers(0, n, size=2))
            if a != b:
                pairs.add((a, b))
        out = [Subject(i, (ob,)) for i, ob in enumerate(_ONE)]
        out += [Subject(n + j, (_ONE[a], _ONE[b])) for j, (a, b) in enumerate(sorted(pairs))]
        return tuple(out)

    def families(self, subject: Subject) -> tuple[Family, ...]:
        return FAMILIES[len(subject.objects)]

    def family(self, subject: Subject, name: str) -> Family | None:
        """``subject``'s family called ``name``; None when its layout has no such family."""
        return _BY_NAME[len(subject.objects)].get(name)

    def is_held_out(self, subject: Subject) -> bool:
        """Subjects no model is trained on (about one in five): unseen scenes for locality."""
        return _unit("subject-split", subject.id) < 0.2

    def subject_split(self, subject: Subject) -> str:
        """``"train"`` (models train on it, edits are made on it), or one half of the held-out subjects:
        ``"pool"`` (a memory's locality pool and calibration may use it) or ``"test"`` (locality probes
        only: nothing is trained, tuned or calibrated on it)."""
        if not self.is_held_out(subject):
            return "train"
        return "pool" if _unit("held-out-half", subject.id) < 0.5 else "test"

    def pairs(self) -> int:
        """Size of the (subject, family) space: every possible edit."""
        return sum(len(self.families(s)) for s in self.subjects)

    # ------------------------------------------------------------------ renderings
    @staticmethod
    def nuisance(split: str, subject_id: int, index: int) -> Nuisance:
        """Rendering ``index`` of a subject from the ``train`` or ``held_out`` nuisance ranges.

        Held-out values lie *between* trained ones (rotation, scale, noise, light bands), or are kinds
        training never draws (the noise and stripes backgrounds, three tints): a model can learn that
        such factors do not matter, and I-Gen asks whether it did, on values it never saw.
        """
        u = [_unit("nuisance", split, subject_id, index, k) for k in range(10)]
        quarter = 90 * int(u[9] * 4) - 180  # objects are seen turned every way, as a picture may be
        shift = (-0.1 + 0.2 * u[2], -0.1 + 0.2 * u[3])  # not held out: both splits shift alike
        if split == "train":
            return Nuisance(
                rotation=_bands(u[0], _TRAIN_ANGLE) + quarter,
                scale=_bands(u[1], _TRAIN_SCALE),
                shift=shift,
                blur=int(u[4] < 0.3),
                noise=_bands(u[5], _TRAIN_NOISE),
                background=_TRAIN_BACKGROUNDS[int(u[6] * len(_TRAIN_BACKGROUNDS))],
                tint=_TRAIN_TINTS[int(u[7] * len(_TRAIN_TINTS))],
                light=_bands(u[8], _TRAIN_LIGHT),
            )
        if split == "held_out":
            return Nuisance(
                rotation=_bands(u[0], ((40.0, 50.0),)) + quarter,  # (angle mod 90) in [40, 50)
                scale=_bands(u[1], _HELD_SCALE),
                shift=shift,
                blur=1,
                noise=_bands(u[5], ((9.0, 13.0),)),
                background=("noise", "stripes")[int(u[6] * 2)],
                tint=_HELD_TINTS[int(u[7] * len(_HELD_TINTS))],
                light=_bands(u[8], _HELD_LIGHT),
            )
        raise ValueError(f"split must be 'train' or 'held_out', not {split!r}")

    def render(self, subject: Subject, split: str = "train", index: int = 0) -> np.ndarray:
        """(64, 64, 3) uint8 rendering ``index`` of ``subject`` from ``split``'s nuisance ranges."""
        seed = int(_unit("pixels", split, subject.id, index) * 2**32)
        return render(subject.objects, self.nuisance(split, subject.id, index), seed)

    def png(self, subject: Subject, split: str = "train", index: int = 0) -> bytes:
        """The rendering as PNG bytes (what an edit stores and a harness passes around)."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.render(subject, split, index)).save(buf, format="PNG")
        return buf.getvalue()
