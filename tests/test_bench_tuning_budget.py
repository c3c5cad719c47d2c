"""`benchmarks/bench_tuning_budget.py` end to end on a 3-edit scenes stream: both parts run, every budget's
row carries the tuning summary the eval now reports, and the report is written. Timings are not asserted."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # two tiny scenes evals with real tuning; ~15 s
def test_tuning_budget_runs_both_parts_and_writes_its_report(tmp_path, capsys):
    from benchmarks.bench_tuning_budget import BUDGETS, main

    assert main(["--quick", "--edits", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tuning_budget_quick.json").read_text())
    assert [r["rows"] for r in report["step_cost"]] == [8, 16, 32]
    assert next(r for r in report["step_cost"] if r["rows"] == 16)["ratio_to_16"] == 1.0
    rows = report["budgets"]
    assert [(r["lr"], r["max_steps"], r["max_examples"], r["patience"]) for r in rows] == list(BUDGETS[:2])
    for r in rows:
        assert r["tunes"] >= 3 and 0 <= r["exact_share"] <= 1 and 1 <= r["mean_steps"] <= r["max_steps"]
        assert 0 <= r["reliability"] <= 1 and r["tune_s_per_edit"] > 0
    assert "| 0.8 | 60 | 8 |" in (tmp_path / "tuning_budget_quick.md").read_text()
    assert "Budgets on a validation stream (3 edits" in capsys.readouterr().out
