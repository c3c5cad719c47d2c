"""Packaging truth: what pyproject.toml declares is what the code imports and what CI installs
(constraints.txt), and the wheel — not only the editable checkout — works on its own."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# declared but never imported by name, each for a reason
RUNTIME_ONLY = {
    "python-multipart": "FastAPI imports it to parse multipart forms",
    "psycopg-binary": "psycopg loads it as its C implementation (with libpq bundled)",
    "ruff": "a command .ci/run runs, not a module",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> dict[str, str]:
    """Every requirement string in pyproject.toml (dependencies and extras) by distribution name."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += [s for s in extra if not s.startswith("esg-memory")]
    out = {}
    for spec in specs:
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        out[_norm(name)] = spec[len(name):]
    return out


def _pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            out[_norm(name)] = version
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _satisfies(version: str, spec: str) -> bool:
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, bound = re.match(r"(>=|<=|==|<|>)\s*(.+)", clause).groups()
        a, b = _version(version), _version(bound)
        n = len(b)
        ok = {">=": a >= b, "<": a[:n] < b, "<=": a[:n] <= b, ">": a > b, "==": a[:n] == b}[op]
        if not ok:
            return False
    return True


def test_constraints_pin_every_declared_distribution_within_its_range():
    pins = _pins()
    for name, spec in _requirements().items():
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert _satisfies(pins[name], spec), f"constraints.txt pins {name}=={pins[name]}, outside {spec!r}"


def test_floors_are_the_tested_versions():
    # "floors at what is tested": a floor below the pinned (tested) minor claims support nobody has run
    pins = _pins()
    for name, spec in _requirements().items():
        floor = re.search(r">=\s*([\d.]+)", spec)
        assert floor, f"{name} has no floor"
        tested = _version(pins[name])
        assert _version(floor.group(1))[:2] == tested[:2], (
            f"{name}: floor {floor.group(1)} is not the tested {pins[name]} series"
        )


def _imported_top_levels() -> set[str]:
    out = set()
    for folder in ("esg_memory", "index", "tests", "benchmarks", "scripts"):
        for p in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    out.add(node.module.split(".")[0])
    return out


def test_every_declared_distribution_is_imported():
    # the converse of test_architecture's "every import is declared": nothing declared that nothing uses
    from importlib.metadata import packages_distributions

    used, imported = set(), _imported_top_levels()
    for module, dists in packages_distributions().items():
        if module in imported:
            used |= {_norm(d) for d in dists}
    unused = sorted(set(_requirements()) - used - set(RUNTIME_ONLY))
    assert unused == [], f"declared in pyproject.toml but imported nowhere: {unused}"


def test_setup_installs_with_the_constraints():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup
    assert "constraints.txt" in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout (isolated build: pyproject's own setuptools), installed without
    dependencies (the venv has them) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp.glob("esg_memory-*.whl")
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def _from_wheel(target: Path, *argv: str) -> subprocess.CompletedProcess:
    code = "import sys, esg_memory, index; from esg_memory.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("ESG_MEMORY_BENCHMARKS", None)
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=target.parent, env=env, capture_output=True, text=True
    )


def test_wheel_holds_both_packages_and_the_shipped_models(wheel_install: Path):
    (wheel,) = wheel_install.parent.glob("esg_memory-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("index/") for n in names)
    assert any(n.startswith("esg_memory/assets/esg-easyvqa-llava/") for n in names)
    assert any(n.startswith("esg_memory/assets/esg-scenes-clip/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert all(f"esg_memory/serve/ui/static/{n}" in names for n in ("index.html", "app.js", "app.css"))
    probe = _from_wheel(wheel_install, "--help")
    assert probe.returncode == 0, probe.stderr
    where = subprocess.run(
        [sys.executable, "-c", "import esg_memory; print(esg_memory.__file__)"],
        env={**os.environ, "PYTHONPATH": str(wheel_install)},
        cwd=wheel_install.parent,  # not the checkout: its folder would come first on sys.path
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(wheel_install)  # the wheel's copy, not the checkout's


def test_bench_from_a_wheel_says_why_and_runs_with_a_checkout(wheel_install: Path):
    refused = _from_wheel(wheel_install, "bench", "index")
    assert refused.returncode == 1
    line = refused.stderr.strip()
    assert "\n" not in line and "--benchmarks" in line and "Traceback" not in line
    ran = _from_wheel(wheel_install, "bench", "--benchmarks", str(ROOT / "benchmarks"), "index", "--help")
    assert ran.returncode == 0, ran.stderr
    assert "--quick" in ran.stdout
