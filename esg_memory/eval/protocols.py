"""The two moving parts of a run: the edit stream (adds, revisions, deletions) and the probe scorer.

:func:`plan_stream` fixes the whole stream up front from a seed, so every target a probe will ever be
scored against is known before the first edit, and the pre-edit model's outputs for all of them are
computed then (with an empty memory, edits disabled) and cached.

:class:`Scorer` runs probes through one :class:`~esg_memory.model.EditedModel`: teacher-forced on a
target (token predictions, ranked top-10, a digest of the logits) plus greedy generation. Outputs are
cached by (probe, target, edit id, edit version): the answer to a probe depends only on which adapter
is injected, so every method that routes a probe to the same edit version shares one model run, and
a probe routed to no edit is run once per stage. ``ours`` runs through the real memory's routing
(``route_keys``); baselines through :class:`~esg_memory.eval.baselines.RoutedMemory`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .baselines import RoutedMemory
from .metrics import ProbeOutput

__all__ = ["Op", "Scorer", "plan_stream"]

logger = logging.getLogger(__name__)

_TOPK = 10


@dataclass(frozen=True)
class Op:
    """One stream operation on case index ``case``: ``add``, ``revise`` (to ``answer``) or ``delete``."""

    kind: str
    case: int
    answer: str | None = None


def plan_stream(
    targets: Sequence[str],
    revisions: Sequence[Sequence[str]],
    seed: int,
    revise_rate: float,
    delete_rate: float,
) -> list[Op]:
    """Add every case in order; after each add, with the given rates, revise or delete an earlier live one.

    A revision sets the next unused candidate of that case's ``revisions`` (a later correction of an
    earlier edit); cases without candidates left are not revised. Seeded, so the same plan every run.
    """
    if not (0 <= revise_rate <= 1 and 0 <= delete_rate <= 1):
        raise InvalidInputError("revise_rate and delete_rate must be in [0, 1]")
    rng = np.random.default_rng(seed + 1)
    ops: list[Op] = []
    live: list[int] = []
    used: dict[int, int] = defaultdict(int)
    for c in range(len(targets)):
        ops.append(Op("add", c))
        earlier = list(live)
        live.append(c)
        if earlier and rng.random() < revise_rate:
            cands = [e for e in earlier if used[e] < len(revisions[e])]
            if cands:
                e = cands[int(rng.integers(len(cands)))]
                ops.append(Op("revise", e, revisions[e][used[e]]))
                used[e] += 1
        if earlier and rng.random() < delete_rate:
            e = earlier[int(rng.integers(len(earlier)))]
            if e in live:
                live.remove(e)
                ops.append(Op("delete", e))
    return ops


class Scorer:
    """Runs probes through an ``EditedModel`` with a chosen routing, caching outputs (module docstring)."""

    def __init__(self, model: Any, batch_size: int = 1):
        if batch_size < 1:
            raise InvalidInputError("batch_size must be >= 1")
        self.model = model
        self.batch_size = int(batch_size)
        self._target_ids: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._cache: dict[tuple, ProbeOutput] = {}
        self._prompt_lens: dict[tuple[str, bool], int] = {}
        self.runs = 0

    # ---- helpers -------------------------------------------------------------------------------
    def target_ids(self, question: str, answer: str, has_image: bool) -> tuple[int, ...]:
        key = (answer, has_image)
        if key not in self._target_ids:
            em = self.model
            prompt = em.family.format_prompt(em.processor, question, has_image)
            ids = tuple(int(t) for t in em.family.target_ids(em.processor, answer, prompt))
            eos = em.processor.tokenizer.eos_token_id
            if len(ids) > 1 and ids[-1] == eos:  # EasyEdit scores the answer's tokens, not the EOS
                ids = ids[:-1]
            if not ids:
                raise InvalidInputError(f"the answer {answer!r} tokenizes to nothing")
            self._target_ids[key] = ids
        return self._target_ids[key]

    def _prompt_len(self, question: str, has_image: bool) -> int:
        key = (question, has_image)
        n = self._prompt_lens.get(key)
        if n is None:
            em = self.model
            text = em.family.format_prompt(em.processor, question, has_image)
            n = len(em.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._prompt_lens[key] = n
        return n

    def _run(
        self,
        images: list,
        questions: list[str],
        targets: list[tuple[int, ...]],
        keys: np.ndarray,
        stage: str,
        route: str | None,
        ids: np.ndarray | None,
    ) -> list[ProbeOutput]:
        """One batch: same target length, all with or all without an image, one routing decision each."""
        import torch

        em = self.model
        imgs = images if images[0] is not None else None
        inputs = em.build_inputs(imgs, questions)
        n, length = inputs["input_ids"].shape
        tgt = torch.tensor(targets, dtype=torch.long, device=inputs["input_ids"].device)
        tf = dict(inputs)
        tf["input_ids"] = torch.cat([inputs["input_ids"], tgt], dim=1)
        tf["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tgt)], dim=1)
        if "mm_token_type_ids" in tf:
            mm = inputs["mm_token_type_ids"]
            tf["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tgt, dtype=mm.dtype)], dim=1)
        gen_kw = {"max_new_tokens": tgt.shape[1] + 1, "do_sample": False}  # the target, then EOS
        real = em.memory
        if route == "fixed":
            em.memory = RoutedMemory(real, ids)
        try:
            with torch.no_grad():
                if stage == "pre":
                    with em.disable_edits():
                        logits = em.forward(**tf).logits
                        seq = em.generate(**inputs, **gen_kw)
                else:
                    rk = np.repeat(keys, 1, axis=0)
                    logits = em.forward(**tf, route_keys=rk).logits
                    seq = em.generate(**inputs, route_keys=rk, **gen_kw)
        finally:
            em.memory = real
        self.runs += n
        seq = seq.sequences if hasattr(seq, "sequences") else seq
        texts = em.family.decode_answers(em.processor, seq, length)
        at = logits[:, length - 1 : length - 1 + tgt.shape[1]].float()
        k = min(_TOPK, at.shape[-1])
        top = torch.topk(at, k, dim=-1).indices.cpu().numpy()
        out = []
        for r in range(n):
            digest = hashlib.sha256(at[r].cpu().numpy().tobytes()).hexdigest()
            out.append(
                ProbeOutput(
                    stage, targets[r], tuple(tuple(int(x) for x in row) for row in top[r]), texts[r], digest
                )
            )
        return out

    def _batched(
        self, rows: list[tuple[Any, str, tuple[int, ...], np.ndarray, int]], stage: str, route: str | None
    ) -> list[ProbeOutput]:
        """rows: (image, question, target ids, key, edit id) -> outputs, in order; grouped into batches.

        A batch holds rows of one routing decision, one target length and one prompt length, so no row
        is padded: on CPU a row's logits then equal its single-row run bit for bit.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (im, q, t, _, e) in enumerate(rows):
            groups[(im is None, len(t), e, self._prompt_len(q, im is not None))].append(i)
        out: list[ProbeOutput | None] = [None] * len(rows)
        for g in groups.values():
            for s in range(0, len(g), self.batch_size):
                idx = g[s : s + self.batch_size]
                res = self._run(
                    [rows[i][0] for i in idx],
                    [rows[i][1] for i in idx],
                    [rows[i][2] for i in idx],
                    np.stack([rows[i][3] for i in idx]),
                    stage,
                    route,
                    np.asarray([rows[i][4] for i in idx]),
                )
                for i, o in zip(idx, res, strict=True):
                    out[i] = o
        return out  # type: ignore[return-value]

    # ---- public --------------------------------------------------------------------------------
    def pre(
        self, items: Sequence[tuple[int, Any, str, str]], keys: np.ndarray
    ) -> dict[tuple[int, str], ProbeOutput]:
        """Pre-edit outputs of ``(probe id, image, question, target)`` items: the bare model, before any edit.

        Refused once the memory holds an edit: pre-edit outputs are only ever measured before editing.
        """
        if len(self.model.memory) != 0:
            raise InvalidInputError("pre-edit outputs must be computed before the first edit is added")
        rows = [(im, q, self.target_ids(q, t, im is not None), keys[p], -1) for p, im, q, t in items]
        outs = self._batched(rows, "pre", None)
        return {(p, t): o for (p, _, _, t), o in zip(items, outs, strict=True)}

    def post(
        self,
        items: Sequence[tuple[int, Any, str, str]],
        keys: np.ndarray,
        edit_ids: Sequence[int],
        versions: Sequence[int],
        real: bool,
    ) -> list[ProbeOutput]:
        """Post-edit outputs with each item's given routing (cached by probe, target, edit, version).

        ``real``: route through the memory itself (``ours``; the decisions must equal ``edit_ids``);
        otherwise inject exactly ``edit_ids`` via :class:`RoutedMemory`.
        """
        out: list[ProbeOutput | None] = [None] * len(items)
        todo = []
        for i, ((p, _im, _q, t), e, v) in enumerate(zip(items, edit_ids, versions, strict=True)):
            hit = self._cache.get((p, t, int(e), int(v)))
            if hit is not None:
                out[i] = hit
            else:
                todo.append(i)
        if todo:
            rows = [
                (
                    items[i][1],
                    items[i][2],
                    self.target_ids(items[i][2], items[i][3], items[i][1] is not None),
                    keys[items[i][0]],
                    int(edit_ids[i]),
                )
                for i in todo
            ]
            res = self._batched(rows, "post", None if real else "fixed")
            for i, o in zip(todo, res, strict=True):
                out[i] = o
                self._cache[(items[i][0], items[i][3], int(edit_ids[i]), int(versions[i]))] = o
        return out  # type: ignore[return-value]
