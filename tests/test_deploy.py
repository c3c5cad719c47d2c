"""docker-compose.yml and deploy/haproxy.cfg describe what the replica tests run as processes.

Container images cannot be pulled here, so the topology itself is tested as local processes
(tests/test_serve_replicas.py); these tests keep the compose file honest: every replica's command line
is one the real ``esg-memory serve`` parser accepts, pointing at the compose PostgreSQL through
``$ESG_MEMORY_STORE``, and the load balancer checks exactly those replicas' ``/health``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from esg_memory.serve.cli import add_serve_arguments

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _replicas(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if name.startswith("replica")}


def test_compose_runs_three_replicas_of_one_store(monkeypatch):
    doc = _compose()
    replicas = _replicas(doc)
    assert len(replicas) == 3
    pg = doc["services"]["postgres"]["environment"]
    for name, svc in replicas.items():
        entry, command = svc["entrypoint"], svc["command"]
        assert entry[:3] == ["python", "-m", "esg_memory.serve"], name
        store = svc["environment"]["ESG_MEMORY_STORE"]
        assert store == (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                         f"{pg['POSTGRES_DB']}")
        monkeypatch.setenv("ESG_MEMORY_STORE", store)
        parser = add_serve_arguments(argparse.ArgumentParser(prog="esg-memory serve"))
        args = parser.parse_args(entry[3:] + command)  # what the container runs
        assert args.store == store and getattr(args, "memory", None) is None
        assert args.host == "0.0.0.0" and args.port == 8000 and args.token_file
        assert args.staleness_bound and args.staleness_bound > 0
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_load_balancer_health_checks_every_replica():
    cfg = (ROOT / "deploy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+):(\d+)\s+check", cfg, flags=re.M)
    assert {s[0] for s in servers} == set(_replicas(_compose()))
    assert all(host == name and port == "8000" for name, host, port in servers)
    assert re.search(r"option httpchk GET /health", cfg) and re.search(r"http-check expect status 200", cfg)


def test_image_installs_the_postgres_extra():
    assert re.search(r'pip install .*"\.\[[^\]]*postgres[^\]]*\]"', (ROOT / "Dockerfile").read_text())
