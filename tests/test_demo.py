"""The demo's story holds on the shipped easy-vqa models (issue 9's "the demo's story holds")."""

from __future__ import annotations

import json

import pytest

from esg_memory.demo import run_demo


@pytest.mark.slow  # end to end, several seconds; still run in CI
def test_demo_story_holds_and_writes_report(tmp_path):
    lines: list[str] = []
    report = run_demo(out_dir=tmp_path, echo=lines.append)
    failed = [text for text, ok in report.checks if not ok]
    assert not failed, failed
    assert len(report.checks) >= 15
    # an edit generalises to another picture of the same subject and leaves other subjects alone
    titles = {s.title.split(".")[0]: s for s in report.steps}
    assert any("other red circle" in r[0] and r[4] == "oval" for r in titles["2"].rows)
    assert all(r[5] == "yes" for r in titles["3"].rows)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passed"] is True
    assert (tmp_path / "report.html").read_text().count("<table") == len(report.steps)
    assert any(line.startswith("Summary:") for line in lines)
