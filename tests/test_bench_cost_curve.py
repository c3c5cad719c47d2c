"""`benchmarks/bench_cost_curve.py` end to end at toy sizes: every checkpoint measures every operation and
the report (table, JSON, plot) is written. Timings are not asserted; the counts and files are."""

from __future__ import annotations

import json


def test_cost_curve_runs_every_phase_and_writes_its_report(tmp_path, capsys):
    from benchmarks.bench_cost_curve import SyntheticEncoder, main

    assert main(["--sizes", "40", "90", "--probes", "3", "--queries", "12", "--replay-records", "4",
                 "--chunk", "25", "--backend", "flat", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cost_curve.json").read_text())
    assert [r["n_edits"] for r in report["rows"]] == [40, 90]
    for r in report["rows"]:
        for key in ("add_ms_median", "delete_ms_median", "route_ms_median", "replay_ms_per_record", "open_s"):
            assert isinstance(r[key], float)
        assert r["add_ms_median"] > 0 and r["route_ms_median"] > 0 and r["open_s"] > 0
    assert (tmp_path / "cost_curve.png").stat().st_size > 1000
    assert "| 90 |" in (tmp_path / "cost_curve.md").read_text() and "| 90 |" in capsys.readouterr().out
    # the synthetic keys are a function of the text alone, unit norm
    enc = SyntheticEncoder()
    a, b = enc.encode_texts(["x?", "x?"]), enc.encode([None], ["x?"])
    assert (a[0] == a[1]).all() and abs(float((b[0] ** 2).sum()) - 1) < 1e-5
