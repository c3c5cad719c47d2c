"""No code path of the library can unpickle what a user loads (the 'nothing foreign is executed' rule).

Static check over every module of ``esg_memory/`` and ``index/`` (parsed, not grepped, so aliases and
``from x import y`` are seen): no pickle-family import, ``torch.load`` only with ``weights_only=True``,
``np.load`` only with ``allow_pickle=False``, no ``yaml.load`` / ``eval`` / ``exec``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("esg_memory", "index")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
#: call target -> (keyword, the only value allowed)
GUARDED = {"torch.load": ("weights_only", True), "numpy.load": ("allow_pickle", False)}
BANNED_CALLS = {"eval", "exec", "yaml.load", "yaml.unsafe_load", "pandas.read_pickle"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def findings(source: str, name: str) -> list[str]:
    """Pickle-capable loads and banned imports/calls in one module's source."""
    tree = ast.parse(source, filename=name)
    alias: dict[str, str] = {}  # local name -> fully qualified
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in BANNED_MODULES:
                    out.append(f"{name}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                out.append(f"{name}:{node.lineno}: imports from {node.module}")
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualified(f: ast.expr) -> str | None:
        if isinstance(f, ast.Name):
            return alias.get(f.id, f.id)
        if isinstance(f, ast.Attribute):
            base = qualified(f.value)
            return None if base is None else f"{base}.{f.attr}"
        return None

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        q = qualified(node.func)
        if q is None:
            continue
        if q in BANNED_CALLS:
            out.append(f"{name}:{node.lineno}: calls {q}")
        if q in GUARDED:
            kw, safe = GUARDED[q]
            val = next((k.value for k in node.keywords if k.arg == kw), None)
            if not (isinstance(val, ast.Constant) and val.value is safe):
                out.append(f"{name}:{node.lineno}: {q} without {kw}={safe}")
    return out


def test_library_never_unpickles():
    files = _modules()
    assert len(files) > 30, "the scan must see the library's modules"
    bad = [f for p in files for f in findings(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "src",
    [
        "import pickle",
        "import dill as d",
        "from joblib import load",
        "import torch\ntorch.load('w.pt')",
        "import torch as t\nt.load('w.pt', weights_only=False)",
        "from torch import load\nload('w.pt')",
        "import numpy as np\nnp.load('a.npy')",
        "import numpy\nnumpy.load('a.npy', allow_pickle=True)",
        "from numpy import load as l\nl('a.npy')",
        "import yaml\nyaml.load(s)",
        "eval('1+1')",
    ],
)
def test_the_scan_catches_each_pattern(src):
    assert findings(src, "x.py"), src


def test_the_scan_accepts_the_safe_forms():
    src = (
        "import torch\nimport numpy as np\ntorch.load('w.pt', map_location='cpu', weights_only=True)\n"
        "np.load(buf, allow_pickle=False)\nfrom safetensors.torch import load_file\nload_file('w')\n"
    )
    assert findings(src, "x.py") == []
