"""The scenes world as an edit set: `esg_memory.worlds.plan_stream`'s edits, rendered (``--kind scenes``).

Each planned edit becomes an `EditCase` whose pictures are PNG bytes rendered from the world's seeds:

- reliability: the edit rendering (train nuisance) with a train phrasing of the family;
- T-Gen: the same rendering, a held-out phrasing; I-Gen: a held-out-nuisance rendering, the edit's
  phrasing; IT-Gen (``i_t_gen``): a held-out rendering with a held-out phrasing;
- T-Loc: a text-only question; M-Loc: a ``test``-split subject (never trained, tuned or calibrated on);
- hard negatives: the edit rendering with another family of the subject; the edit's phrasing on
  another subject whose (subject, family) no edit of the stream covers.

`esg_memory.worlds.check_stream` proves the plan valid before anything is rendered. The locality pool
(what the memory and the global threshold may calibrate on) is `esg_memory.worlds.scenes_locality_pool`:
``pool``-split subjects only, so no probe's subject is in it.
"""

from __future__ import annotations

from ..errors import ConfigError
from .cases import EditCase, EvalDataset, Probe

__all__ = ["SCENES_MAX_EDITS", "scenes_dataset"]

#: Distinct edits the world's trained-on subjects allow (every (subject, family) pair of the train split).
SCENES_MAX_EDITS = 49_158


def scenes_dataset(n_edits: int, seed: int = 0, progress: bool = False) -> EvalDataset:
    """``n_edits`` planned, checked and rendered edits of the scenes world (module docstring)."""
    from ..worlds import ScenesWorld, check_stream, plan_stream, scenes_locality_pool

    world = ScenesWorld()
    if not 1 <= int(n_edits) <= SCENES_MAX_EDITS:
        raise ConfigError(f"the scenes set holds 1..{SCENES_MAX_EDITS} edits, not {n_edits}")
    plan = plan_stream(world, int(n_edits), seed=seed)
    problems = check_stream(world, plan)
    if problems:  # a bug in the planner, never the user's input
        raise RuntimeError(f"invalid scenes stream: {problems[:3]}")
    subjects = world.subjects
    cache: dict[tuple[int, str, int], bytes] = {}

    def png(subject: int, rendering: tuple[str, int]) -> bytes:
        key = (subject, *rendering)
        if key not in cache:
            cache[key] = world.png(subjects[subject], rendering[0], rendering[1])
        return cache[key]

    def ask(p) -> tuple[bytes | None, str]:
        if p.text is not None:
            return None, p.text
        f = world.family(subjects[p.subject], p.family)
        return png(p.subject, p.rendering), getattr(f, p.phrasing[0])[p.phrasing[1]]

    rows = plan
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(plan, desc="rendering scenes", unit="edit")
    cases = []
    for e, pe in enumerate(rows):
        s = subjects[pe.subject]
        fam = world.family(s, pe.family)
        by = {p.kind: p for p in pe.probes}
        image, question = ask(by["reliability"])
        truth = s.answer(fam)
        alts = [a for a in s.alternatives(fam) if a != pe.new_answer]

        def fixed(kind: str, by=by) -> Probe | None:
            p = by.get(kind)
            if p is None:
                return None
            im, q = ask(p)
            ps = subjects[p.subject]
            answer = "yes" if p.text is not None else ps.answer(world.family(ps, p.family))
            return Probe(kind, im, q, answer)

        cases.append(
            EditCase(
                uid=f"scenes:{e}",
                source="scenes",
                image=image,
                question=question,
                target=pe.new_answer,
                pred=truth,
                subject=f"scene {pe.subject}",
                rephrase=ask(by["t_gen"])[1],
                image_rephrase=(ask(by["i_gen"])[0],),
                image_text_rephrase=(ask(by["i_t_gen"]),),
                loc=fixed("t_loc"),
                m_loc=fixed("m_loc"),
                hard=tuple(p for p in (fixed("hard_same_image"), fixed("hard_same_question")) if p),
                revisions=(*alts[:2], truth),  # the last: "it was right"
            )
        )
    pool = scenes_locality_pool(world)
    return EvalDataset("scenes", cases, "files", pool=pool, source=f"scenes world v{world.version}")
