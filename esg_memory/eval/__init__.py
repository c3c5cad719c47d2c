"""Evaluation harness: EasyEdit-compatible data, metrics and sequential protocols, with baselines.

Not imported by the library's hot path. ``run_eval(EvalConfig(...), out_dir)`` runs one evaluation and
returns the results dict (also written as ``results.json``, ``results.md`` and PNG plots); the
``esg-memory eval`` command is a shell over it. See docs/eval.md.
"""

from __future__ import annotations

from .aggregate import aggregate, deletion_audit, interaction_audit
from .baselines import (
    METHODS,
    KeyViews,
    RoutedMemory,
    baseline_route,
    calibrate_global,
    grace_radii,
    nearest_rule,
)
from .cases import EditCase, EvalDataset, Probe
from .data import (
    DATA_KINDS,
    DatasetError,
    load_dataset,
    load_mmedit,
    load_pool,
    load_text_records,
    load_vlkeb,
    subject_of,
    subject_png,
)
from .metrics import (
    ProbeOutput,
    exact_match,
    locality,
    normalize_answer,
    residue,
    scope_audit,
    token_accuracy,
)
from .report import render_markdown, strip_timings
from .runner import CHECKPOINTS, EvalConfig, run_eval
from .textside import SubjectTextEncoder

__all__ = [
    "CHECKPOINTS",
    "DATA_KINDS",
    "METHODS",
    "DatasetError",
    "EditCase",
    "EvalConfig",
    "EvalDataset",
    "KeyViews",
    "Probe",
    "ProbeOutput",
    "RoutedMemory",
    "SubjectTextEncoder",
    "aggregate",
    "baseline_route",
    "calibrate_global",
    "deletion_audit",
    "exact_match",
    "grace_radii",
    "interaction_audit",
    "load_dataset",
    "load_mmedit",
    "load_pool",
    "load_text_records",
    "load_vlkeb",
    "locality",
    "nearest_rule",
    "normalize_answer",
    "render_markdown",
    "residue",
    "run_eval",
    "scope_audit",
    "strip_timings",
    "subject_of",
    "subject_png",
    "token_accuracy",
]
