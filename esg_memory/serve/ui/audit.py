"""An eval run's audit as the debugger's Audit view shows it: `EvalAudit` reads an ``esg-memory eval --out``
directory once (``results.json``, ``audit.jsonl``, ``probe_images/``; `esg_memory.eval.audit`) and answers
``GET /audit`` and ``GET /audit/images/{sha}`` from it.

- `EvalAudit.reply`: the run, the audit summary per method and protocol (results.json's shares beside the
  label counts of the per-edit rows, which must agree), the rows of one method and protocol (each edit with
  its label and its probes: question, picture, target, generated answer, exact match, the edit that fired,
  ours' score / threshold / margin), and that method's deletion audit (each deleted edit's probes and their
  residue right after the delete and at the end).
- `EvalAudit.image`: a thumbnail's bytes by its sha256. The name must be 64 hex digits (anything else is
  refused before a path is built, so no name can leave ``probe_images/``), the file a regular one and no
  symbolic link, a PNG, and its content must hash to the name (None otherwise: a 404).

No FastAPI here: the routes (`esg_memory.serve.ui.audit_routes`) call these in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Any

from index.fs import read_regular_file

from ...errors import ConfigError, InvalidInputError
from ...eval.audit import AUDIT_FILE, AUDIT_FORMAT, IMAGES_DIR, LABELS

__all__ = ["SHA_RE", "EvalAudit"]

#: A thumbnail's name: the sha256 of its PNG bytes, lower-case hex.
SHA_RE = re.compile(r"[0-9a-f]{64}")
_SHARES = ("correct", "under", "over", "fail")
_PNG = b"\x89PNG\r\n\x1a\n"
_MAX_THUMBNAIL_BYTES = 1 << 20  # a 96-pixel PNG is a few KB


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_regular_file(path))
    except FileNotFoundError:
        raise ConfigError(f"{what} is missing: {str(path)!r}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {e}") from None


class EvalAudit:
    """One eval run's audit, read once from its output directory (it does not change under a server)."""

    def __init__(self, directory: str | Path):
        root = Path(directory)
        if not root.is_dir():
            raise ConfigError(f"eval directory {str(root)!r} does not exist (esg-memory eval --out DIR)")
        self.root = root.resolve()
        self.name = self.root.name
        res = _read_json(self.root / "results.json", "the run's results.json")
        if not isinstance(res, dict) or res.get("format") != "esg-memory-eval":
            raise ConfigError(f"{str(self.root / 'results.json')!r} is not an esg-memory eval result")
        self.results = res
        self.cases: dict[int, dict[str, Any]] = {}
        self.probes: dict[int, dict[str, Any]] = {}
        self.edits: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.deleted: dict[str, dict[int, dict[str, list[dict[str, Any]]]]] = {}
        self._read_lines(self.root / AUDIT_FILE)

    def _read_lines(self, path: Path) -> None:
        try:
            text = read_regular_file(path).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{str(path)!r} is missing: the run predates the audit file; run "
                              "`esg-memory eval` again") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{str(path)!r} cannot be read: {e}") from None
        header = None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                x = json.loads(line)
                kind = x["type"]
                if kind == "header":
                    header = x
                elif kind == "case":
                    self.cases[int(x["case"])] = x
                    for p in x["probes"]:
                        self.probes[int(p["probe"])] = p
                elif kind == "edit":
                    self.edits.setdefault((x["method"], x["protocol"]), []).append(x)
                elif kind == "deletion":
                    per = self.deleted.setdefault(x["method"], {})
                    per.setdefault(int(x["case"]), {})[x["stage"]] = x["probes"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{str(path)!r} line {n} is not an audit record ({e})") from None
        if header is None or header.get("format") != AUDIT_FORMAT or header.get("format_version") != 1:
            raise ConfigError(f"{str(path)!r} is not an {AUDIT_FORMAT} v1 file")
        self.methods: list[str] = [str(m) for m in header["methods"]]
        self.protocols: list[str] = [str(p) for p in header["protocols"]]

    # ---------------------------------------------------------------------------------------- replies
    def run_info(self) -> dict[str, Any]:
        r = self.results
        d, s, m = r.get("data", {}), r.get("stream", {}), r.get("model", {})
        return {"name": self.name, "source": d.get("source"), "kind": d.get("kind"),
                "image_mode": d.get("image_mode"), "model": m.get("spec"), "encoder": m.get("encoder"),
                "seed": r.get("seed"), "n_adds": s.get("n_adds"), "n_revisions": s.get("n_revisions"),
                "n_deletions": s.get("n_deletions"), "methods": self.methods, "protocols": self.protocols}

    def summary(self) -> list[dict[str, Any]]:
        """Per method and protocol: results.json's audit shares and the label counts of the rows."""
        out = []
        for method in self.methods:
            for protocol in self.protocols:
                agg = (self.results.get("methods", {}).get(method) or {}).get(protocol)
                rows = self.edits.get((method, protocol), [])
                if agg is None and not rows:
                    continue
                a = (agg or {}).get("audit", {})
                counts = Counter(r["label"] for r in rows)
                out.append({"method": method, "protocol": protocol, "n_edits": len(rows),
                            "n_successful": a.get("n_successful"),
                            "shares": {k: a.get(k) for k in _SHARES},
                            "counts": {k: counts.get(k, 0) for k in LABELS}})
        return out

    def _probe(self, p: dict[str, Any]) -> dict[str, Any]:
        static = self.probes.get(int(p["probe"]), {})
        return {"kind": static.get("kind"), "question": static.get("question"), "image": static.get("image"),
                **p}

    def _case(self, c: int) -> dict[str, Any]:
        case = self.cases.get(c, {})
        return {"case": c, "uid": case.get("uid"), "edit_id": case.get("edit_id"),
                "question": case.get("question"), "answer": case.get("answer"), "image": case.get("image"),
                "deleted": bool(case.get("deleted"))}

    def rows(self, method: str, protocol: str, label: str | None = None) -> list[dict[str, Any]]:
        """The per-edit rows of ``method`` under ``protocol`` (only ``label``'s when given)."""
        out = []
        for r in self.edits.get((method, protocol), []):
            if label is not None and r["label"] != label:
                continue
            probes = [self._probe(p) for p in r["probes"]]
            row = self._case(int(r["case"]))
            rel = next((p for p in probes if p["kind"] == "reliability"), None)
            if rel is not None and rel.get("target") is not None:
                row["answer"] = rel["target"]  # the answer it was scored on (a revision changes it)
            row.update(label=r["label"], reliable=r["reliable"], generalizes=r["generalizes"],
                       leaks=r["leaks"], probes=probes)
            out.append(row)
        return out

    def deletions(self, method: str) -> list[dict[str, Any]]:
        """Each deleted edit of the stream with its probes' residue under ``method``, per stage."""
        out = []
        for c, stages in sorted(self.deleted.get(method, {}).items()):
            row = self._case(c)
            for stage in ("right_after", "final"):
                row[stage] = [self._probe(p) for p in stages.get(stage, [])]
            out.append(row)
        return out

    def reply(self, method: str | None = None, protocol: str | None = None,
              label: str | None = None) -> dict[str, Any]:
        """``GET /audit``: the run, the summary, and the rows and deletions of one method and protocol
        (defaults: ``ours``, ``retention`` when the run has it)."""
        method = method or ("ours" if "ours" in self.methods else self.methods[0])
        if method not in self.methods:
            raise InvalidInputError(f"method {method!r} is not in this run ({', '.join(self.methods)})")
        if not self.protocols:  # nothing was scored (a retention-only run that deleted every edit)
            protocol = protocol or None
        else:
            protocol = protocol or ("retention" if "retention" in self.protocols else self.protocols[0])
        if protocol is not None and protocol not in self.protocols:
            raise InvalidInputError(f"protocol {protocol!r} is not in this run ({', '.join(self.protocols)})")
        if label is not None and label not in LABELS:
            raise InvalidInputError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
        deletion = (self.results.get("methods", {}).get(method) or {}).get("deletion")
        return {"run": self.run_info(), "method": method, "protocol": protocol, "labels": list(LABELS),
                "summary": self.summary(), "rows": self.rows(method, protocol, label),
                "deletion": deletion, "deletions": self.deletions(method)}

    def image(self, sha: str) -> bytes | None:
        """A thumbnail's PNG bytes by name (`SHA_RE`; another name is an `InvalidInputError`), or None
        when the run has no such thumbnail, it is a link or not a regular file, it is not a PNG, or its
        bytes do not hash to its name."""
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
            raise InvalidInputError("a thumbnail is named by the sha256 of its bytes (64 lower-case hex)")
        path = self.root / IMAGES_DIR / f"{sha}.png"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # missing, or a symbolic link
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_THUMBNAIL_BYTES:
                return None
            data = os.read(fd, _MAX_THUMBNAIL_BYTES + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if not data.startswith(_PNG) or hashlib.sha256(data).hexdigest() != sha:
            return None
        return data
