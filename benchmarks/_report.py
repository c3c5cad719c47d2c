"""Writing a benchmark's results: ``<stem>.json`` (the report) and ``<stem>.md`` (its table), the table
also printed. One place for what every results/ pair looks like."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def write_report(out: str | Path, stem: str, report: dict[str, Any], markdown: str) -> Path:
    """Write ``report`` and ``markdown`` under ``out`` (created); returns the JSON's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    sys.stdout.write(markdown)
    return path
