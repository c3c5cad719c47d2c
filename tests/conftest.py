"""Test-wide settings: never touch a model hub, keep torch to the cores CI has."""

from __future__ import annotations

import os

# Set before transformers/open_clip are imported by any test module: a hub miss otherwise
# costs ~45 s of retries. Tests only; the library itself never writes the environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # index-only environments
        yield
        return
    # Tiny models are dominated by per-op overhead: one thread is 5-7x faster than two here.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def serve_base():
    """(model, processor, encoder): the seeded random tiny LLaVA and the tiny offline CLIP, loaded once for
    every service test (the wrapper never mutates them)."""
    from esg_memory.loading import load_base_model, load_encoder

    model, processor = load_base_model("tiny-random-llava")
    return model, processor, load_encoder("esg-tiny-clip")


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (`tests/_postgres.py`); fails in CI when absent."""
    from _postgres import start_server

    server = start_server()
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server."""
    return pg_server.database()
