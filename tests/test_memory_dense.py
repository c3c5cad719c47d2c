"""Dense neighbourhoods: when every key looks like every other (an untrained encoder), one write
re-fits a bounded number of edits, and deletion and arrival order stay exact."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from _memory_fixtures import HashKeyEncoder, shape_image
from test_memory_exact import assert_same_scopes

from esg_memory.config import MemoryConfig
from esg_memory.errors import ConfigError
from esg_memory.memory import EditMemory

COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
SHAPES = ["circle", "rectangle", "triangle"]
WORDS = ["colour", "shape", "size", "count", "texture", "edge", "corner", "shade", "tone", "form"]


class DenseEncoder(HashKeyEncoder):
    """`HashKeyEncoder` squeezed into a narrow cone: every pair of keys is at cosine > 0.98."""

    def __init__(self, spread: float = 0.08) -> None:
        super().__init__(dim=64, name=f"test-dense:{spread}")
        self._axis = np.eye(64)[0]
        self._spread = spread

    def encode(self, images, texts) -> np.ndarray:
        v = super().encode(images, texts).astype(np.float64)
        out = self._axis + self._spread * v
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def dense_stream(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = [WORDS[j] for j in rng.choice(len(WORDS), 2, replace=False)]
        out.append(
            {
                "image": shape_image(
                    COLORS[rng.integers(6)], SHAPES[rng.integers(3)], shift=int(rng.integers(3))
                ),
                "question": f"What {w[0]} and {w[1]} has item {i}?",
                "answer": f"answer {rng.integers(4)}",
                "edit_id": 10 + i,
            }
        )
    return out


CFG = {"n_text_positives": 1, "n_image_positives": 1, "n_generic_questions": 2, "neighbour_k": 2}


def build(edits: list[dict], cap: int, one_by_one: bool = True) -> EditMemory:
    m = EditMemory(
        DenseEncoder(), MemoryConfig(max_neighbours=cap, **CFG), locality_pool=["Who wrote Hamlet?"]
    )
    if one_by_one:
        for e in edits:
            m.add(**e)
    elif edits:
        m.add_many(edits)
    return m


def probes(seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed + 100)
    ims = [shape_image(COLORS[rng.integers(6)], SHAPES[rng.integers(3)], shift=1) for _ in range(24)]
    txs = [f"What {WORDS[rng.integers(10)]} has item {rng.integers(30)}?" for _ in range(24)]
    return ims, txs


def _refitted(caplog) -> list[int]:
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("re-fitted edits")]
    assert len(msgs) == 1
    return [int(x) for x in re.findall(r"\d+", msgs[0])]


@pytest.mark.parametrize("cap", [3, 6])
def test_one_add_refits_a_bounded_set_as_the_memory_grows(caplog, cap):
    edits = dense_stream(0, 48)
    m = build([], cap)
    counts = []
    for e in edits:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="esg_memory.memory"):
            m.add(**e)
        got = _refitted(caplog)
        counts.append(len(got))
        # What was re-fitted is exactly the new edit plus the edits whose neighbour set now holds it.
        holders = sorted(x.id for x in m.list() if e["edit_id"] in x.constrained_by)
        assert got == sorted({e["edit_id"], *holders})
        assert all(len(x.constrained_by) <= cap for x in m.list())
    # Dense: the whole memory is within the radius, yet writes stay bounded (not growing with n).
    # Each edit holds `cap` neighbours, so the edits holding a newcomer number `cap` on average
    # (exactly, for an exchangeable stream); one add can exceed that when the newcomer is a hub
    # (near many edits at once), but never approaches n.
    assert len(m.get(10).constrained_by) == cap
    late = counts[len(counts) // 2 :]
    assert np.mean(late) <= cap + 1.5
    assert max(late) <= 3 * cap + 1 < len(edits) // 2


def test_uncapped_config_refits_every_dense_neighbour(caplog):
    m = build(dense_stream(1, 12), 0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="esg_memory.memory"):
        m.add(**dense_stream(2, 13)[-1] | {"edit_id": 99})
    assert len(_refitted(caplog)) == 13  # the old rule: every edit within the radius


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_delete_is_exact_and_order_free(seed):
    edits = dense_stream(seed, 30)
    full = build(edits, 4)
    # Delete the edit held by the most neighbour sets: the most re-fits to undo.
    held = {e["edit_id"]: 0 for e in edits}
    for x in full.list():
        for n in x.constrained_by:
            held[n] += 1
    victim = max(held, key=lambda i: (held[i], -i))
    assert held[victim] > 0
    full.delete(victim)
    full.settle()
    rest = [e for e in edits if e["edit_id"] != victim]
    shuffled = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
    ims, txs = probes(seed)
    assert_same_scopes(full, build(shuffled, 4), ims, txs)
    assert_same_scopes(full, build(rest, 4, one_by_one=False), ims, txs)


def test_dense_revise_then_rollback_restores_every_scope():
    edits = dense_stream(3, 20)
    a, ref = build(edits, 3), build(edits, 3)
    a.revise(15, answer="something else", question="Which tone and edge has item 99?")
    a.rollback(15, 1)
    ims, txs = probes(3)
    assert_same_scopes(a, ref, ims, txs)


def test_max_neighbours_is_validated_and_saved(tmp_path):
    with pytest.raises(ConfigError):
        MemoryConfig(max_neighbours=-1)
    m = build(dense_stream(4, 8), 3)
    m.save(tmp_path / "m")
    back = EditMemory.load(tmp_path / "m", DenseEncoder())
    assert back.config.max_neighbours == 3
    ims, txs = probes(4)
    assert_same_scopes(m, back, ims, txs)


def test_dense_interleaved_writes_match_a_replay_of_the_survivors():
    edits = dense_stream(5, 26)
    m = build([], 3)
    rng = np.random.default_rng(9)
    alive = []
    for e in edits:
        m.add(**e)
        alive.append(e)
        if len(alive) > 4 and rng.random() < 0.35:
            m.delete(alive.pop(int(rng.integers(len(alive))))["edit_id"])
    target = alive[len(alive) // 2]
    m.revise(target["edit_id"], answer="revised", question="What edge and tone has item 77?")
    alive = [
        dict(e, answer="revised", question="What edge and tone has item 77?") if e is target else e
        for e in alive
    ]
    ims, txs = probes(5)
    assert_same_scopes(m, build(alive, 3), ims, txs)
