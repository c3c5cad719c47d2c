"""What a run leaves behind: ``results.json``, ``results.md`` (tables) and PNG plots (matplotlib, Agg);
``probes.json`` / ``probes.jsonl``, and ``audit.jsonl`` with ``probe_images/`` (`esg_memory.eval.audit`)."""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from index import atomic_write_bytes

from ..errors import ConfigError
from .aggregate import EDIT_GEN_KINDS
from .audit import AUDIT_FILE, IMAGES_DIR, AuditInput, write_audit

__all__ = [
    "check_plotting",
    "environment",
    "probe_lines",
    "render_markdown",
    "strip_timings",
    "write_outputs",
]

_COLS = (
    ("reliability", "Rel"),
    ("t_gen", "T-Gen"),
    ("i_gen", "I-Gen"),
    ("i_t_gen", "IT-Gen"),
    ("t_loc", "T-Loc"),
    ("m_loc", "M-Loc"),
    ("portability", "Port"),
    ("hard_loc", "hard-neg loc"),
)
_EM = (
    ("reliability_em", "Rel EM"),
    ("t_gen_em", "T-Gen EM"),
    ("i_gen_em", "I-Gen EM"),
    ("i_t_gen_em", "IT-Gen EM"),
    ("portability_em", "Port EM"),
    ("loc_unchanged", "loc answers unchanged"),
)
logger = logging.getLogger(__name__)
_PACKAGES = ("esg-memory", "torch", "transformers", "open_clip_torch", "faiss-cpu", "numpy", "easy-vqa")


def environment() -> dict[str, str | None]:
    """Python and package versions (None for packages not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def strip_timings(results: dict[str, Any]) -> dict[str, Any]:
    """The results without wall-clock figures (what must be equal between two runs of one seed)."""
    return {k: v for k, v in results.items() if k != "timings"}


def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def render_markdown(res: dict[str, Any]) -> str:
    d, s = res["data"], res["stream"]
    lines = [
        f"# Evaluation: {d['source']} ({d['image_mode']} images), {s['n_adds']} edits",
        "",
        f"Model `{res['model']['spec']}` ({res['model']['model_type']}), "
        f"encoder `{res['model']['encoder']}`, "
        f"seed {res['seed']}; stream: {s['n_adds']} adds, {s['n_revisions']} revisions, "
        f"{s['n_deletions']} deletions. Token accuracy (EasyEdit), locality vs the pre-edit model "
        "(T-Loc top-1, M-Loc top-10); same adapters for every method, only the routing rule differs.",
    ]
    for proto in ("immediate", "retention"):
        rows = {m: v[proto] for m, v in res["methods"].items() if v.get(proto)}
        if not rows:
            continue
        lines += [
            "",
            f"## {proto}",
            "",
            "| method | " + " | ".join(c for _, c in _COLS) + " | audit correct / under / over / fail |",
            "|---|" + "---|" * (len(_COLS) + 1),
        ]
        for m, v in rows.items():
            a = v["audit"]
            aud = " / ".join(_f(a[k]) for k in ("correct", "under", "over", "fail"))
            lines.append(f"| {m} | " + " | ".join(_f(v[k]) for k, _ in _COLS) + f" | {aud} |")
        lines += [
            "",
            "| method | " + " | ".join(c for _, c in _EM) + " | right edit fired | loc: any edit fired |",
            "|---|" + "---|" * (len(_EM) + 2),
        ]
        for m, v in rows.items():
            r = v["routing"]
            lines.append(
                f"| {m} | "
                + " | ".join(_f(v[k]) for k, _ in _EM)
                + f" | {_f(r['right_edit'])} | {_f(r['loc_any_edit'])} |"
            )
        kinds = [
            k
            for k in EDIT_GEN_KINDS
            if any(v.get("fidelity", {}).get(k) is not None for v in rows.values())
        ]
        if kinds:
            lines += [
                "",
                "Where vs what: the right edit fires (router) / the new answer with the right edit forced in "
                "(adapter), per probe kind.",
                "",
                "| method | " + " | ".join(f"{k}: fires / fidelity" for k in kinds) + " |",
                "|---|" + "---|" * len(kinds),
            ]
            for m, v in rows.items():
                r, f = v["routing"].get("right_edit_by_kind", {}), v.get("fidelity", {})
                lines.append(
                    f"| {m} | " + " | ".join(f"{_f(r.get(k))} / {_f(f.get(k))}" for k in kinds) + " |"
                )
    lines += [
        "",
        "## audits",
        "",
        "| method | interaction: moved / degraded / improved | deletion residue right after: text / "
        "tokens / bits (routed) | at end: text / tokens / bits (routed) |",
        "|---|---|---|---|",
    ]
    for m, v in res["methods"].items():
        it, de = v.get("interaction"), v["deletion"]
        its = "—" if not it else f"{_f(it['moved'])} / {_f(it['degraded'])} / {_f(it['improved'])}"
        cells = []
        for part in ("right_after", "final"):
            x = de[part]
            cells.append(f"{_f(x['text'])} / {_f(x['tokens'])} / {_f(x['bits'])} ({_f(x['routed'])})")
        lines.append(f"| {m} | {its} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"{de['n_deleted']} deleted edits; residue counts their probes that no longer answer exactly as "
        "the pre-edit model (0 is exact); 'routed' = some other edit fired on them.",
        "",
        *scope_markdown(res.get("scope")),
    ]
    return "\n".join(lines)


def check_plotting() -> None:
    """Fail before a long run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("the evaluation plots need matplotlib (pip install 'esg-memory[eval]')") from None


def _plots(res: dict[str, Any], out: Path) -> list[str]:
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curve = res["curve"]
    proto = "retention" if any(p["methods"]["ours"]["retention"] for p in curve) else "immediate"
    keys = [k for k, _ in _COLS[:5]] + ["hard_loc"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    xs = [p["n_edits"] for p in curve]
    for ax, key in zip(axes.ravel(), keys, strict=True):
        for m in res["methods"]:
            ys = [p["methods"][m][proto][key] if p["methods"][m][proto] else None for p in curve]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=m)
        ax.set(title=f"{key} ({proto})", xlabel="# edits", ylim=(-0.02, 1.02))
        if len(xs) > 1 and max(xs) / max(min(xs), 1) >= 10:
            ax.set_xscale("log")
    axes[0, 0].legend(fontsize=7)
    # fixed margins: tight_layout costs more than the rest of the plotting together
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.95, wspace=0.22, hspace=0.35)
    fig.savefig(out / "metrics_vs_edits.png", dpi=80)
    plt.close(fig)
    written.append("metrics_vs_edits.png")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), squeeze=False)
    colours = {"correct": "#2ca02c", "under": "#1f77b4", "over": "#d62728", "fail": "#7f7f7f"}
    for ax, p in zip(axes[0], ("immediate", "retention"), strict=True):
        names = [m for m, v in res["methods"].items() if v.get(p)]
        # shares are among successful edits: say how many those are
        labels = [
            f"{m} ({res['methods'][m][p]['audit']['n_successful']}/{res['methods'][m][p]['n_edits']})"
            for m in names
        ]
        left = [0.0] * len(names)
        for c, col in colours.items():
            vals = [res["methods"][m][p]["audit"][c] or 0.0 for m in names]
            ax.barh(labels, vals, left=left, color=col, label=c)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set(title=f"scope audit ({p}), share of successful edits", xlim=(0, 1))
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.16, right=0.99, bottom=0.1, top=0.9, wspace=0.45)
    fig.savefig(out / "scope_audit.png", dpi=80)
    plt.close(fig)
    written.append("scope_audit.png")
    return written


def _pareto(res: dict[str, Any], out: Path) -> list[str]:
    """``scope_pareto.png``: every global rule's threshold sweep as a curve, ours as a point."""
    sc = res.get("scope")
    if not sc:
        return []
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, curve in sc["curves"].items():
        ax.plot([p["leak"] for p in curve], [p["recall"] for p in curve], label=f"{name} (sweep)")
    o = sc["ours"]
    ax.scatter([o["leak"]], [o["recall"]], color="black", zorder=5, label="ours (learned scope)")
    ax.set(
        xlabel="leak: any edit fires on a locality / hard-negative probe",
        ylabel="recall: the right edit fires on a generalization probe",
        title="scope after the stream (retention)",
        xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.11, top=0.93)
    fig.savefig(out / "scope_pareto.png", dpi=80)
    plt.close(fig)
    return ["scope_pareto.png"]


def scope_markdown(sc: dict[str, Any] | None) -> list[str]:
    """The scope section of ``results.md``: ours against each rule's sweep."""
    if not sc:
        return []
    o = sc["ours"]
    lines = [
        "## scope on both axes (retention)",
        "",
        f"Ours: recall {o['recall']:.3f} (the right edit fires on {sc['n_gen_probes']} generalization "
        f"probes), leak {o['leak']:.3f} (any edit fires on {sc['n_loc_probes']} locality / hard-negative "
        "probes). Each rule's best recall at ours' leak or less is over its whole threshold sweep on these "
        "very probes (an oracle threshold).",
        "",
        "| rule | best recall at ours' leak (oracle threshold) | ours above the whole curve |",
        "|---|---|---|",
    ]
    for k in sc["curves"]:
        beats = "yes" if sc["ours_beats"][k] else "no"
        lines.append(f"| {k} | {_f(sc['oracle_at_our_leak'][k])} | {beats} |")
    return [*lines, ""]


#: ``probes.jsonl`` names for ``probes.json`` columns (the others keep their names).
_PROBE_LINE_NAMES = {
    "answer": "generated",
    "em": "exact_match",
    "ours_score": "score",
    "ours_threshold": "threshold",
    "ours_margin": "margin",
}


def probe_lines(columns: dict[str, Any], protocol: str = "retention", method: str = "ours") -> list[dict]:
    """``probes.json``'s column-wise table as one dict per probe (the lines of ``probes.jsonl``): the
    probe's ``kind``, ``protocol``, ``method``, the ``generated`` text, ``target``, ``exact_match``, the
    edit that ``fired`` (id, or None), ``score`` / ``threshold`` / ``margin``, then every other column."""
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    out = []
    for i in range(n):
        row = {_PROBE_LINE_NAMES.get(k, k): columns[k][i] for k in names}
        fired = row.pop("ours_edit", -1)
        head = {
            "probe": row.pop("probe", i),
            "case": row.pop("case", None),
            "kind": row.pop("kind", None),
            "protocol": protocol,
            "method": method,
            "generated": row.pop("generated", None),
            "target": row.pop("target", None),
            "exact_match": row.pop("exact_match", None),
            "fired": None if fired is None or fired < 0 else int(fired),
        }
        out.append({**head, **row})
    return out


def write_outputs(
    results: dict[str, Any], out: Path, probes: dict[str, Any] | None = None, audit: AuditInput | None = None
) -> None:
    """``results.json`` (atomic), ``results.md``, the PNG plots and, given the per-probe table,
    ``probes.json`` (column-wise) and ``probes.jsonl`` (the same, a line per probe) into ``out``; given
    the audit's input, ``audit.jsonl`` and the probes' thumbnails in ``probe_images/``
    (`esg_memory.eval.audit`)."""
    out.mkdir(parents=True, exist_ok=True)
    results["files"] = ["results.json", "results.md", *_plots(results, out), *_pareto(results, out)]
    if probes is not None:
        doc = {"format": "esg-memory-eval-probes", "format_version": 1, "columns": probes}
        atomic_write_bytes(out / "probes.json", json.dumps(doc).encode("utf-8"))
        lines = "".join(json.dumps(r) + "\n" for r in probe_lines(probes))
        atomic_write_bytes(out / "probes.jsonl", lines.encode("utf-8"))
        results["files"] += ["probes.json", "probes.jsonl"]
    if audit is not None:
        wrote = write_audit(audit, out)
        logger.info("audit: %d lines (%d bytes), %d thumbnails (%d bytes)", wrote["lines"], wrote["bytes"],
                    wrote["images"], wrote["image_bytes"])
        results["files"] += [AUDIT_FILE, *([IMAGES_DIR] if wrote["images"] else [])]
    atomic_write_bytes(out / "results.md", render_markdown(results).encode("utf-8"))
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=1, sort_keys=False).encode("utf-8"))
