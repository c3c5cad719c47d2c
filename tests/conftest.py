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
