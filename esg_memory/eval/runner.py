"""``run_eval``: one evaluation run, from data to ``results.json``, a markdown table and plots.

A run (see docs/eval.md): load the data and the model; plan the seeded edit stream (adds with
revisions and deletions); encode every probe once; compute the *pre-edit* outputs of every
(probe, target) the stream will ever score, before any edit exists; then apply the stream through an
``EditedModel`` (tuned adapters), scoring

- **immediate**: each edit's probes right after it is added (every method, same state);
- **retention**: every live edit's probes at checkpoints N = 1, 10, 100, 1000 (10 000) and at the end;
- **interaction**: how each live edit's outcomes moved between its immediate and its final scoring;
- **deletion residue**: deleted edits' probes against the pre-edit outputs, right after the delete
  and at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError
from .aggregate import EDIT_GEN_KINDS, aggregate, deletion_audit, interaction_audit, probe_record
from .audit import AuditInput
from .baselines import METHODS, KeyViews, baseline_route
from .cases import EvalDataset
from .data import load_dataset
from .protocols import Op, Scorer, plan_stream
from .sweep import probe_table, scope_sweep
from .timing import StageClock, TimedEncoder

__all__ = ["CHECKPOINTS", "EvalConfig", "run_eval"]

logger = logging.getLogger(__name__)

#: Stream sizes at which retention is measured (those below N, and N itself).
CHECKPOINTS = (1, 10, 100, 1000, 10000)
_BIG = 1000
#: Built-in worlds: (their CLIP, their LLaVA), the defaults of ``--clip`` / ``--model`` for the kind.
_WORLD_MODELS = {
    "easyvqa": ("esg-easyvqa-clip", "tiny-llava"),
    "scenes": ("esg-scenes-clip", "esg-scenes-llava"),
}


@dataclass
class EvalConfig:
    """Everything that determines a run's results (recorded in ``results.json``)."""

    kind: str = "easyvqa"
    """Data kind: vqa, caption, vlkeb, counterfact, zsre, easyvqa."""
    data: str | None = None
    """JSON file of records (not needed for easyvqa)."""
    image_root: str | None = None
    """Directory the records' relative image paths resolve under; None: text-side mode."""
    pool_dir: str | None = None
    """Directory holding the MMEdit locality pools; None: two levels above ``data``."""
    model: str | None = None
    """Model spec for ``load_base_model`` (registered name, local directory or HF id); None: by kind
    (scenes: esg-scenes-llava; otherwise tiny-llava, the shipped easy-vqa LLaVA)."""
    clip: str | None = None
    """Key encoder spec; None: by kind (easyvqa: esg-easyvqa-clip; text-side: subject-id+minilm;
    scenes: esg-scenes-clip; counterfact/zsre: minilm; real images: esg-easyvqa-clip — pass a real CLIP
    there)."""
    edits: int = 100
    """Stream length N (number of edits added)."""
    protocol: Literal["immediate", "retention", "both"] = "both"
    seed: int = 0
    big: bool = False
    """Allow N > 1000 (the 10 000 stream)."""
    tune_lr: float | None = None
    """Adam learning rate of adapter tuning (`AdapterConfig.lr`); None: the library default."""
    tune_max_steps: int | None = None
    """Most tuning steps per edit (`AdapterConfig.max_steps`); None: the library default."""
    tune_patience: int | None = None
    """Stop tuning an edit after this many steps without progress (`AdapterConfig.patience`)."""
    tune_examples: int | None = None
    """Most tuning examples per edit (`AdapterConfig.max_examples`: the edit's input first, then its
    positives, rewrites and image views); None: the library default."""
    immediate_sample: int | None = None
    """Score the immediate protocol on a seeded sample of this many edits (None: every edit); the
    10 000 stream's ``--immediate-sample 1000``. Retention always scores every live edit."""
    revise_rate: float = 0.1
    """Chance, after each add, that an earlier live edit is corrected again (a revision)."""
    delete_rate: float = 0.05
    """Chance, after each add, that an earlier live edit is deleted."""
    tune: Literal["sync", "never"] = "sync"
    """Adapters tuned to an exact match (``sync``) or compiled only (``never``; faster, weaker)."""
    batch_size: int = 16
    """Most probes per model call. Rows are batched only with rows of the same routing decision, target
    length and prompt length, so nothing is padded; on CPU that keeps each row's logits bit-identical to
    a single-row run (checked in the tests). On a GPU, kernels may differ with the batch size: use 1
    when the bit-level residue column matters there."""
    methods: tuple[str, ...] = METHODS
    budget: float = 0.01
    """Pool share the global-threshold baselines may let in when calibrated."""
    device: str = "cpu"
    """Where the model and the key encoder run (``"cuda"`` on a GPU; the model is moved there whole)."""
    dtype: str | None = None
    """Model dtype for ``from_pretrained`` (``"float16"``, ``"bfloat16"``); None: the model's default."""

    def validate(self) -> None:
        if self.protocol not in ("immediate", "retention", "both"):
            raise ConfigError(f"protocol must be immediate, retention or both, not {self.protocol!r}")
        if self.edits < 1:
            raise ConfigError("edits must be >= 1")
        if self.edits > _BIG and not self.big:
            raise ConfigError(f"streams over {_BIG} edits need big=True (--big)")
        if (self.tune_lr is not None and not self.tune_lr > 0) or any(
            v is not None and v < 1 for v in (self.tune_max_steps, self.tune_examples, self.tune_patience)
        ):
            raise ConfigError(
                "tune_lr must be > 0; tune_max_steps, tune_examples and tune_patience >= 1"
                " (or None: the library default)"
            )
        if self.immediate_sample is not None and self.immediate_sample < 1:
            raise ConfigError("immediate_sample must be >= 1 (or None: every edit)")
        if self.tune not in ("sync", "never"):
            raise ConfigError(f"tune must be 'sync' or 'never', not {self.tune!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or "ours" not in self.methods:
            raise ConfigError(f"methods must include 'ours' and come from {', '.join(METHODS)}; got {bad}")


def _encoder_spec(cfg: EvalConfig, ds: EvalDataset) -> str:
    if cfg.clip:
        return cfg.clip
    if ds.kind in _WORLD_MODELS:
        return _WORLD_MODELS[ds.kind][0]
    if ds.image_mode == "text-side":
        return "subject-id+minilm"
    if ds.image_mode == "none":
        return "minilm"
    return "esg-easyvqa-clip"


def _model_spec(cfg: EvalConfig) -> str:
    if cfg.model:
        return cfg.model
    return _WORLD_MODELS.get(cfg.kind, ("", "tiny-llava"))[1]


def _load_encoder(spec: str, device: str = "cpu") -> Any:
    from ..encoders import create_encoder
    from .textside import TEXT_SIDE_PREFIX, SubjectTextEncoder

    if spec.startswith(TEXT_SIDE_PREFIX):
        return SubjectTextEncoder(_load_encoder(spec[len(TEXT_SIDE_PREFIX) :], device))
    if device == "cpu":
        return create_encoder(spec)
    try:
        return create_encoder(spec, device=device)
    except TypeError:
        raise ConfigError(f"encoder {spec!r} cannot be placed on {device!r}") from None


class _Run:
    """State of one run: probes, keys, the stream's live edits, and per-method results."""

    def __init__(self, cfg: EvalConfig, ds: EvalDataset, em: Any, enc: Any):
        self.cfg, self.ds, self.em, self.enc = cfg, ds, em, enc
        self.methods = [m for m in METHODS if m in cfg.methods]
        self.images: list[Any] = []
        self.questions: list[str] = []
        self.kinds: list[str] = []
        self.owner: list[int] = []
        self.fixed: list[str | None] = []
        self.by_case: list[list[int]] = []
        for c, case in enumerate(ds.cases):
            ids = []
            for p in [*case.generalization_probes(), *case.locality_probes(), *case.portability]:
                ids.append(len(self.images))
                self.images.append(p.image)
                self.questions.append(p.question)
                self.kinds.append(p.kind)
                self.owner.append(c)
                self.fixed.append(p.target)
            self.by_case.append(ids)
        self.keys = KeyViews.encode(enc, self.images, self.questions)
        self.pool = KeyViews.encode(enc, [im for im, _ in ds.pool], [t for _, t in ds.pool])
        self.anchor_probe = [ids[0] for ids in self.by_case]  # the reliability probe = the edit's input
        self.answer = [case.target for case in ds.cases]
        self.eid: dict[int, int] = {}
        self.version: dict[int, int] = {}
        self.live: list[int] = []
        self.scorer = Scorer(em, cfg.batch_size)
        self.pre: dict = {}

    def scope_at_end(self, probes: list[int], final: list[dict]) -> tuple[dict, dict]:
        """(sweep summary, per-probe table) over ``probes`` in the current state: every global rule's
        threshold sweep against ours (`esg_memory.eval.sweep`); ``final`` are ours' records of them."""
        live = list(self.live)
        row_of = {c: i for i, c in enumerate(live)}
        q = self.keys.take(np.asarray(probes, dtype=np.int64))
        anchors = self.keys.take(np.asarray([self.anchor_probe[c] for c in live], dtype=np.int64))
        owner = np.asarray([row_of.get(self.owner[p], -1) for p in probes], dtype=np.int64)
        ours = self.em.memory.route(keys=q.joint)
        table = probe_table([self.kinds[p] for p in probes], owner, q, anchors, ours)
        table["probe"] = list(probes)
        table["case"] = [self.owner[p] for p in probes]
        table["answer"] = [r["answer"] for r in final]
        table["target"] = [self.target(p) for p in probes]
        table["em"] = [bool(r["em"]) for r in final]
        table["fidelity"] = [r.get("fidelity") for r in final]
        owner_fired = np.asarray([bool(r["owner_fired"]) for r in final])
        return scope_sweep(table, anchors, [self.answer[c] for c in live], owner_fired), table

    def target(self, p: int) -> str:
        return self.fixed[p] if self.fixed[p] is not None else self.answer[self.owner[p]]

    def pre_items(self, ops: list[Op]) -> list[tuple[int, Any, str, str]]:
        """Every (probe, target) the stream will score: fixed targets, plus every answer a case will have."""
        answers: dict[int, set[str]] = {c: {case.target} for c, case in enumerate(self.ds.cases)}
        for op in ops:
            if op.kind == "revise":
                answers[op.case].add(op.answer)
        items = []
        for p in range(len(self.images)):
            ts = [self.fixed[p]] if self.fixed[p] is not None else sorted(answers[self.owner[p]])
            items += [(p, self.images[p], self.questions[p], t) for t in ts]
        return items

    # ---- routing and scoring -------------------------------------------------------------------
    def route_ours(self, probes: list[int]) -> Any:
        """The memory's `RouteResult` for ``probes`` (None while it holds no edit)."""
        if not len(self.em.memory):
            return None
        return self.em.memory.route(keys=self.keys.take(np.asarray(probes, dtype=np.int64)).joint)

    def route(self, method: str, probes: list[int]) -> np.ndarray:
        q = self.keys.take(np.asarray(probes, dtype=np.int64))
        if method == "ours":
            r = self.route_ours(probes)
            return np.full(len(probes), -1) if r is None else np.asarray(r.edit_ids, dtype=np.int64)
        live = self.live
        anchors = self.keys.take(np.asarray([self.anchor_probe[c] for c in live], dtype=np.int64))
        idx = baseline_route(
            method,
            anchors,
            [self.answer[c] for c in live],
            q,
            self.pool,
            self.em.memory.config.margin,
            self.cfg.budget,
            self.em.memory.config.min_threshold,
        )
        ids = np.asarray([self.eid[c] for c in live] + [-1], dtype=np.int64)
        return ids[idx]

    def score(self, probes: list[int]) -> dict[str, list[dict]]:
        """Per method, one record per probe under the current state (``ours`` first: the real path)."""
        out: dict[str, list[dict]] = {}
        if not probes:
            return {m: [] for m in self.methods}
        items = [(p, self.images[p], self.questions[p], self.target(p)) for p in probes]
        case_of = {e: c for c, e in self.eid.items()}
        # where vs what: each generalization probe of a live edit also runs with that edit forced in
        # (the same adapters for every method; outputs are cached, so a probe the router already sent
        # to its own edit costs nothing more)
        forced: dict[int, Any] = {}
        own = [
            (p, self.eid[self.owner[p]])
            for p in probes
            if self.kinds[p] in EDIT_GEN_KINDS and self.owner[p] in self.eid
        ]
        if own:
            f_items = [(p, self.images[p], self.questions[p], self.target(p)) for p, _ in own]
            f_vers = [self.version.get(self.owner[p], 0) for p, _ in own]
            f_outs = self.scorer.post(f_items, self.keys.joint, [e for _, e in own], f_vers, real=False)
            forced = {p: o for (p, _), o in zip(own, f_outs, strict=True)}
        for m in self.methods:
            detail = self.route_ours(probes) if m == "ours" else None
            ids = self.route(m, probes) if detail is None else np.asarray(detail.edit_ids, dtype=np.int64)
            vers = [self.version.get(case_of.get(int(e), -1), 0) if e >= 0 else 0 for e in ids]
            outs = self.scorer.post(items, self.keys.joint, ids, vers, real=m == "ours")
            out[m] = [
                probe_record(
                    self.kinds[p],
                    self.target(p),
                    o,
                    self.pre.get((p, self.target(p))),
                    int(e),
                    self.eid.get(self.owner[p], -2),
                    self.owner[p],
                    p,
                    forced.get(p),
                )
                for p, o, e in zip(probes, outs, ids, strict=True)
            ]
            for i, (p, rec) in enumerate(zip(probes, out[m], strict=True)):  # for audit.jsonl
                rec["target"] = self.target(p)
                if detail is not None:
                    rec["score"] = float(detail.scores[i])
                    rec["threshold"] = float(detail.thresholds[i])
                    rec["margin"] = float(detail.margins[i])
        return out

    def audit_input(self, records: dict, deleted: dict) -> AuditInput:
        """What ``audit.jsonl`` needs (`esg_memory.eval.audit`): the cases, the probes, the records."""
        cases = [{"uid": k.uid, "edit_id": self.eid.get(c), "question": k.question, "answer": self.answer[c],
                  "image": k.image, "deleted": c in self.eid and c not in self.live}
                 for c, k in enumerate(self.ds.cases)]
        return AuditInput(cases, self.owner, self.kinds, self.questions, self.images, records, deleted)


def run_eval(
    config: EvalConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    dataset: EvalDataset | None = None,
    model: tuple[Any, Any] | None = None,
    encoder: Any = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one evaluation; write ``results.json``, ``results.md`` and plots to ``out_dir`` (if given).

    ``dataset``, ``model`` (``(base, processor)``) and ``encoder`` override what ``config`` names
    (tests and notebooks that already hold them). Returns the results dict.
    """
    from ..config import AdapterConfig, EditedModelConfig
    from ..loading import load_base_model, new_memory
    from ..memory import EditMemory
    from ..model import EditedModel
    from .report import check_plotting, environment, write_outputs

    cfg = config or EvalConfig()
    cfg.validate()
    if out_dir is not None:
        check_plotting()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    ds = dataset or load_dataset(
        cfg.kind, cfg.data, cfg.image_root, limit=cfg.edits, seed=cfg.seed, pool_dir=cfg.pool_dir
    )
    if len(ds.cases) < cfg.edits:
        logger.warning("the data holds %d edits, fewer than the %d asked for", len(ds.cases), cfg.edits)
    ds = replace(ds, cases=ds.cases[: cfg.edits])  # the caller's dataset stays as it was
    spec = _encoder_spec(cfg, ds)
    enc = encoder if encoder is not None else _load_encoder(spec, cfg.device)
    model_spec = _model_spec(cfg)
    base, processor = model if model is not None else load_base_model(
        model_spec, device=None if cfg.device == "cpu" else cfg.device, dtype=cfg.dtype or None
    )
    timed = TimedEncoder(enc)  # the memory's encoder: its seconds are the writes' encoding stage
    if ds.kind in _WORLD_MODELS and spec == _WORLD_MODELS[ds.kind][0]:  # its domain pool and config
        mem = new_memory(timed, spec, locality_pool=ds.pool)  # ds.pool *is* that domain's pool
    else:
        mem = EditMemory(timed, locality_pool=ds.pool or None)
    adapters = AdapterConfig(
        **{k: v for k, v in (("lr", cfg.tune_lr), ("max_steps", cfg.tune_max_steps),
                             ("max_examples", cfg.tune_examples), ("patience", cfg.tune_patience))
           if v is not None}
    )
    em = EditedModel.wrap(
        base, processor, memory=mem, encoder=timed, config=EditedModelConfig(adapters=adapters)
    )
    timings["load_s"] = time.perf_counter() - t_start

    t = time.perf_counter()
    run = _Run(cfg, ds, em, enc)
    ops = plan_stream(run.answer, [c.revisions for c in ds.cases], cfg.seed, cfg.revise_rate, cfg.delete_rate)
    timings["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    run.pre = run.scorer.pre(run.pre_items(ops), run.keys.joint)
    timings["pre_edit_s"] = time.perf_counter() - t

    immediate: dict[str, list[dict]] = {m: [] for m in run.methods}
    latest_immediate: dict[str, dict[int, list[dict]]] = {m: {} for m in run.methods}
    deleted: list[int] = []
    del_immediate: dict[str, list[dict]] = {m: [] for m in run.methods}
    curve: list[dict] = []
    n = len(ds.cases)
    checkpoints = sorted({c for c in CHECKPOINTS if c < n} | {n})
    do_imm = cfg.protocol in ("immediate", "both")
    sampled = set(range(n))
    if cfg.immediate_sample is not None and cfg.immediate_sample < n:
        pick = np.random.default_rng(cfg.seed).choice(n, cfg.immediate_sample, replace=False)
        sampled = {int(c) for c in pick}
    do_ret = cfg.protocol in ("retention", "both")
    edit_s: list[float] = []
    tuned: list[Any] = []  # TuneReports, in stream order
    clock = StageClock()
    bar = _progress(len(ops), progress)
    n_added = 0
    final_ret: dict[str, list[dict]] | None = None
    for k, op in enumerate(ops):
        case = ds.cases[op.case]
        t = time.perf_counter()
        enc_before = timed.seconds
        if op.kind == "add":
            run.eid[op.case] = em.add_edit(case.image, case.question, case.target, tune="never")
            run.version[op.case] = 1
            run.live.append(op.case)
            n_added += 1
        elif op.kind == "revise":
            run.version[op.case] = em.revise_edit(run.eid[op.case], tune="never", answer=op.answer)
            run.answer[op.case] = op.answer
        else:
            em.delete_edit(run.eid[op.case])
            run.live.remove(op.case)
            deleted.append(op.case)
        write_s = time.perf_counter() - t
        if op.kind == "delete":
            clock.add("delete", write_s)
        else:
            clock.add("encode", timed.seconds - enc_before)
            clock.add("scope", write_s - (timed.seconds - enc_before))
        if op.kind != "delete" and cfg.tune == "sync":  # what add_edit(tune="sync") does, timed apart
            with clock.stage("tune"):
                tuned.append(em.tune_edit(run.eid[op.case], check=False))  # the probes that follow check
        edit_s.append(time.perf_counter() - t)
        if op.kind in ("add", "revise") and do_imm and op.case in sampled:
            with clock.stage("probe_immediate"):
                recs = run.score(run.by_case[op.case])
            for m in run.methods:
                if op.kind == "add":
                    immediate[m] += recs[m]
                latest_immediate[m][op.case] = recs[m]
        elif op.kind == "delete":
            gen = [p for p in run.by_case[op.case] if run.kinds[p] in EDIT_GEN_KINDS]
            with clock.stage("probe_deleted"):
                scored = run.score(gen)
            for m, recs in scored.items():
                del_immediate[m] += recs
        last_of_step = k + 1 == len(ops) or ops[k + 1].kind == "add"
        if last_of_step and n_added in checkpoints:
            point: dict[str, Any] = {"n_edits": n_added, "live": len(run.live), "methods": {}}
            with clock.stage("probe_retention"):
                ret = run.score([p for c in run.live for p in run.by_case[c]]) if do_ret else None
            for m in run.methods:
                point["methods"][m] = {
                    "immediate": aggregate(immediate[m]) if do_imm else None,
                    "retention": aggregate(ret[m]) if ret is not None else None,
                }
            curve.append(point)
            final_ret = ret
        if bar is not None:
            bar.update(1)
            bar.set_postfix(edits=n_added, live=len(run.live))
        if echo is not None and op.kind == "add" and n_added in checkpoints:
            echo(f"{n_added} edits: checkpoint scored")
    if bar is not None:
        bar.close()
    timings["stream_s"] = time.perf_counter() - t_start - sum(timings.values())
    del_final = run.score([p for c in deleted for p in run.by_case[c] if run.kinds[p] in EDIT_GEN_KINDS])

    methods: dict[str, Any] = {}
    for m in run.methods:
        methods[m] = {
            "immediate": aggregate(immediate[m]) if do_imm else None,
            "retention": aggregate(final_ret[m]) if do_ret else None,
            "interaction": (
                interaction_audit(latest_immediate[m], final_ret[m]) if do_imm and do_ret else None
            ),
            "deletion": deletion_audit(del_immediate[m], del_final[m], len(deleted)),
        }
    scope, table = None, None
    if do_ret and final_ret is not None and run.live:
        scope, table = run.scope_at_end([p for c in run.live for p in run.by_case[c]], final_ret["ours"])
    results: dict[str, Any] = {
        "format": "esg-memory-eval",
        "format_version": 1,
        "seed": cfg.seed,
        "config": {**asdict(cfg), "methods": list(run.methods), "encoder_spec": spec},
        "data": {
            "kind": ds.kind,
            "source": ds.source,
            "image_mode": ds.image_mode,
            "n_cases": n,
            "n_probes": len(run.images),
            "pool_size": len(ds.pool),
        },
        "model": {"spec": model_spec, "model_type": em.family.model_type, "encoder": enc.name},
        "stream": {
            "n_adds": n,
            "n_revisions": sum(o.kind == "revise" for o in ops),
            "n_deletions": len(deleted),
            "checkpoints": checkpoints,
        },
        "methods": methods,
        "scope": scope,
        "curve": curve,
        "versions": environment(),
        "timings": {
            **timings,
            "edit_op_median_s": float(np.median(edit_s)) if edit_s else None,
            "model_runs": run.scorer.runs,
            "stages": clock.report(n),
            "tuning": _tuning_summary(tuned),
            "total_s": time.perf_counter() - t_start,
        },
    }
    if out_dir is not None:
        recs = {m: {**({"immediate": immediate[m]} if do_imm else {}),
                    **({"retention": final_ret[m]} if do_ret and final_ret else {})} for m in run.methods}
        gone = {m: {"right_after": del_immediate[m], "final": del_final[m]} for m in run.methods}
        write_outputs(results, Path(out_dir), probes=table, audit=run.audit_input(recs, gone))
    return results


def _tuning_summary(reports: list[Any]) -> dict[str, Any] | None:
    """How the stream's tunes ended: how many, the share that reached an exact match on every tuning
    example, and their mean steps (None without tuning)."""
    if not reports:
        return None
    return {
        "tunes": len(reports),
        "exact_share": sum(bool(r.exact) for r in reports) / len(reports),
        "mean_steps": float(np.mean([r.steps for r in reports])),
        "mean_examples": float(np.mean([r.n_examples for r in reports])),
    }


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="edit stream", unit="op")
