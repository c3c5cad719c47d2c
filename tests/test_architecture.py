"""The layout rules of docs/architecture.md, checked on the source: no import cycles, private modules private.

The import graph includes imports inside functions (a lazy import still couples two modules), and a
package importing its own submodule (``__init__`` re-exporting) is not a cycle. A private module
(``_name``) may be imported only by modules of the package that owns it. The checker is tested on
small planted trees first, so a green run means the rules hold, not that the checker saw nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("esg_memory", "index")


def _modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for p in (root / pkg).rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of ``mods`` that module ``name`` imports anywhere in its body."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                b = base[: len(base) - node.level + 1]
                mod = ".".join(b + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found.update(t for t in targets if t in mods and t != name)
    return found


def graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    mods = _modules(root, packages)
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), package re-exports excused."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package importing its own submodule (a re-export) is not a design cycle
            comp = [x for x in comp if not any(y.startswith(x + ".") for y in comp)]
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def private_imports(g: dict[str, set[str]]) -> list[str]:
    """``importer -> module`` where the module is private to a package the importer is not in."""
    bad = []
    for importer, targets in g.items():
        for t in targets:
            parts = t.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])  # the package the private module belongs to
                    if importer != owner and not importer.startswith(owner + "."):
                        bad.append(f"{importer} -> {t}")
                    break
    return sorted(bad)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checker_finds_cycles_including_lazy_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import x\n",
            "pkg/a.py": "from .b import y\nx = 1\n",
            "pkg/b.py": "def f():\n    from .a import x\n    return x\ny = 2\n",
            "pkg/c.py": "from . import a\n",
        },
    )
    g = graph(root, ("pkg",))
    assert cycles(g) == [["pkg.a", "pkg.b"]]  # the package's re-export of a is not one
    (root / "pkg/b.py").write_text("y = 2\n")
    assert cycles(graph(root, ("pkg",))) == []


def test_the_checker_finds_private_imports_across_packages(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/_low.py": "z = 0\n",
            "pkg/sub/__init__.py": "from .._low import z\n",  # inside pkg: allowed
            "pkg/sub/_inner.py": "w = 1\n",
            "pkg/other.py": "from .sub._inner import w\n",  # pkg.sub's private module from pkg.other
            "top/__init__.py": "import pkg._low\n",
        },
    )
    assert private_imports(graph(root, ("pkg", "top"))) == ["pkg.other -> pkg.sub._inner", "top -> pkg._low"]


def test_no_import_cycles():
    assert cycles(graph(ROOT)) == []


def test_private_modules_stay_private():
    assert private_imports(graph(ROOT)) == []


def test_no_prefixed_flat_modules():
    # file-name prefixes standing in for folders: a concept gets a subpackage
    flat = sorted(
        p.name
        for p in (ROOT / "esg_memory").glob("*.py")
        if p.name.startswith(("_memory_", "serve_", "_model_"))
    )
    assert flat == []


def _third_party_imports() -> dict[str, set[str]]:
    import sys

    out: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        out.setdefault(top, set()).add(str(p.relative_to(ROOT)))
    return out


def test_every_imported_package_is_declared():
    # "declare everything you import": each third-party module the library imports belongs to a
    # distribution named in pyproject.toml (dependencies or an extra), not only to a dependency's dependency
    import re
    from importlib.metadata import packages_distributions

    declared = {
        re.split(r"[<>=!~\[; ]", spec.strip().strip('"'))[0].lower().replace("_", "-")
        for spec in re.findall(r'"([A-Za-z0-9_.\-]+[^"]*)"', (ROOT / "pyproject.toml").read_text())
    }
    dists = packages_distributions()
    missing = {}
    for mod, where in _third_party_imports().items():
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [])}
        assert names, f"{mod} (imported by {sorted(where)[:2]}) is not installed"
        if not names & declared:
            missing[mod] = sorted(names)
    assert missing == {}, missing
