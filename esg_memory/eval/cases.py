"""The edit-benchmark record types every loader produces and the harness consumes.

`EditCase` is one edit with its probes, `Probe` one scored input, `EvalDataset` the cases plus the
locality pool. They depend on nothing else in the harness, so every loader (:mod:`.data`'s file
readers, :mod:`.easyvqa`'s built-in set) imports them from here and none imports another loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EditCase", "EvalDataset", "ImageRef", "Probe"]

#: An image as the harness passes it on: a file path, encoded bytes (text-side placeholders), or None.
ImageRef = str | bytes | None


@dataclass(frozen=True)
class Probe:
    """One input the harness scores: ``(image, question)`` with a teacher-forced ``target``.

    For generalization probes (``reliability``, ``t_gen``, ``i_gen``, ``i_t_gen``) ``target`` is None:
    they are scored against the edit's *current* answer, which a revision changes.
    """

    kind: str
    image: ImageRef
    question: str
    target: str | None = None


@dataclass(frozen=True)
class EditCase:
    """One edit and every probe of it the data defines."""

    uid: str
    """``<source>:<record index>``."""
    source: str
    image: ImageRef
    question: str
    target: str
    """The new answer the edit asks for (``alt`` / ``target_new``)."""
    pred: str | None = None
    """What the unedited model answered, where the data says."""
    subject: str | None = None
    rephrase: str | None = None
    """Rephrased question (T-Gen), same image."""
    image_rephrase: tuple[ImageRef, ...] = ()
    """Other pictures of the same subject (I-Gen), with the edit's question."""
    image_text_rephrase: tuple[tuple[ImageRef, str], ...] = ()
    """Another picture of the subject *and* a rephrased question at once (``i_t_gen``), where the data
    has such pairs (the scenes world: held-out rendering x held-out phrasing)."""
    loc: Probe | None = None
    """Text-only unrelated question (T-Loc)."""
    m_loc: Probe | None = None
    """Unrelated image + question (M-Loc)."""
    hard: tuple[Probe, ...] = ()
    """Hard negatives (same picture + another question; same question + another subject's picture):
    scored like M-Loc, reported separately."""
    portability: tuple[Probe, ...] = ()
    revisions: tuple[str, ...] = ()
    """Other answers a later correction of this edit may set (the protocol picks from them)."""

    def generalization_probes(self) -> list[Probe]:
        out = [Probe("reliability", self.image, self.question)]
        if self.rephrase:
            out.append(Probe("t_gen", self.image, self.rephrase))
        out += [Probe("i_gen", im, self.question) for im in self.image_rephrase]
        out += [Probe("i_t_gen", im, q) for im, q in self.image_text_rephrase]
        return out

    def locality_probes(self) -> list[Probe]:
        return [p for p in (self.loc, self.m_loc) if p is not None] + list(self.hard)


@dataclass
class EvalDataset:
    """Edit cases plus what the memory may learn from (the locality pool) and how images were found."""

    kind: str
    cases: list[EditCase]
    image_mode: str
    """``"files"`` (real pictures), ``"text-side"`` (subject-id placeholders), ``"none"`` (text data)."""
    pool: list[tuple[ImageRef, str]] = field(default_factory=list)
    """Unrelated inputs no edit may answer: the memory's locality pool and the global threshold's
    calibration set (the same for every method)."""
    source: str = ""
