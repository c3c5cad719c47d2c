"""The routing fast path of wrapped calls: `route_ids` (a margin scan before the candidate search).

An unedited input must cost the wrapper as little as possible, without ever routing differently
from `EditMemory.route`: these tests pin the equivalence and the bound it rests on, and check that
the out-of-scope call reaches the base model with the caller's own arguments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _index_fixtures import near, single_faiss_thread, unit
from _memory_fixtures import HashKeyEncoder
from _memory_fixtures import shape_image as mem_shape
from _model_fixtures import bare_generate, one_thread, shape_image, tiny, tiny_encoder

from esg_memory.config import MemoryConfig
from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel
from index import IndexConfig, ScopedIndex

_ = single_faiss_thread  # autouse fixture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _index(seed: int, d: int = 24) -> tuple[ScopedIndex, np.random.Generator]:
    rng = np.random.default_rng(seed)
    ix = ScopedIndex(d)
    ids = np.repeat(np.arange(40), rng.integers(1, 4, size=40))
    keys = unit(rng, ids.size, d)
    thr = rng.uniform(0.2, 0.9, size=ids.size).astype(np.float32)
    ix.add(ids, keys, thr)
    ix.remove([3, 17, 29])  # dead slots must never count
    return ix, rng


@pytest.mark.parametrize("seed", [0, 1])
def test_scan_margins_bound_what_search_reports(seed):
    ix, rng = _index(seed)
    live = ix.edit_ids()
    parts = [ix.keys_of(int(e)) for e in live]
    keys = np.concatenate([k for k, _ in parts]).astype(np.float64)
    thr = np.concatenate([t for _, t in parts]).astype(np.float64)
    # queries on top of keys (in scope), near them (around the thresholds) and random (out of scope)
    k32 = keys.astype(np.float32)
    q = np.vstack([k32[:5], near(rng, k32[5:25], 0.8), unit(rng, 20, 24)])
    scan = ix.scan_margins(q)
    exact = (q.astype(np.float64) @ keys.T - thr).max(axis=1)
    assert scan.dtype == np.float32 and np.abs(scan - exact).max() <= ix.scan_error
    big = np.vstack([q] * 3)  # a large batch takes the BLAS product instead of the per-query kernel
    assert big.shape[0] >= ix.config.small_call_rows
    assert np.abs(ix.scan_margins(big) - np.tile(exact, 3)).max() <= ix.scan_error
    res = ix.search(q, k=len(ix))
    clear = scan < -ix.scan_error
    assert clear.any() and (~clear).any()
    assert not res.in_scope[clear].any() and (ix.match(q)[clear] == -1).all()
    assert res.in_scope.any(axis=1)[~clear].sum() > 0
    # the reported key is the edit's key at key_positions, in keys_of order
    for i, j in zip(*np.nonzero(res.edit_ids >= 0), strict=True):
        k, t = ix.keys_of(int(res.edit_ids[i, j]))
        pos = int(res.key_positions[i, j])
        assert t[pos] == res.thresholds[i, j]
        assert abs(float(k[pos] @ q[i]) - float(res.scores[i, j])) < 1e-5
    assert (res.key_positions[res.edit_ids < 0] == -1).all()
    empty = ScopedIndex(24)
    assert np.isneginf(empty.scan_margins(q[:2])).all()
    assert empty.search(q[:2], 3).key_positions.shape == (2, 3)


def _dense_memory() -> tuple[EditMemory, list, list]:
    colors = ["red", "blue", "green", "yellow"]
    qs = ["What color is the shape?", "What shape is shown?", "Is the shape large?", "How many shapes?"]
    rng = np.random.default_rng(5)
    mem = EditMemory(HashKeyEncoder(), MemoryConfig(n_text_positives=2, n_image_positives=1))
    specs = [
        {"image": mem_shape(colors[i % 4], ["circle", "rectangle", "triangle"][i % 3]),
         "question": qs[int(rng.integers(4))], "answer": ["alpha", "beta", "gamma"][i % 3]}
        for i in range(14)
    ]
    mem.add_many(specs)
    ims = [s["image"] for s in specs] + [mem_shape(c, "triangle", shift=1) for c in colors]
    txs = [s["question"] for s in specs]
    txs += ["Who wrote this?", "What color is the shape?", "Is it red?", "Why?"]
    return mem, ims, txs


@pytest.mark.parametrize("clustered", [False, True])
def test_route_ids_equals_route_whatever_the_batch(clustered):
    mem, ims, txs = _dense_memory()
    if clustered:  # the rule-out's cluster filter, which real memories use from 2048 keys on
        ix = mem.snapshot(settle=False).index  # the live index (a snapshot shares it)
        ix.reconfigure(IndexConfig(prune_min_keys=8, prune_keys_per_cluster=2))
        ix.prepare_rule_out()
        assert ix.stats()["rule_out_ready"]
    keys = mem.route(images=ims, texts=txs).keys
    ref = mem.route(keys=keys).edit_ids
    assert (ref >= 0).any() and (ref < 0).any(), "the probes mix in-scope and out-of-scope rows"
    assert np.array_equal(mem.route_ids(keys=keys), ref)
    assert np.array_equal(mem.route_ids(images=ims, texts=txs), ref)
    for rows in ([0], [len(ims) - 1], [len(ims) - 1, 0, len(ims) - 2, 3], list(range(len(ims)))[::-1]):
        assert np.array_equal(mem.route_ids(keys=keys[rows]), ref[rows])
    # a write is seen by the very next call, on both paths
    victim = int(ref[ref >= 0][0])
    mem.delete(victim)
    after = mem.route(keys=keys).edit_ids
    assert victim not in after.tolist()
    assert np.array_equal(mem.route_ids(keys=keys), after)
    assert mem.route_ids(keys=keys[:0]).shape == (0,)
    assert EditMemory(HashKeyEncoder()).route_ids(keys=keys).tolist() == [-1] * len(ims)


@pytest.fixture(scope="module")
def wrapped():
    model, proc = tiny("llava")
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    img = shape_image((220, 30, 30), "circle")
    eid = em.add_edit(img, "what color is the shape?", "purple", tune="never")
    return em, model, proc, img, eid


def test_out_of_scope_call_reaches_the_base_model_untouched(wrapped, monkeypatch):
    em, model, proc, _, _ = wrapped
    imgs, qs = [shape_image((30, 200, 30), "rect")], ["is there a green shape?"]
    inputs, bare = bare_generate(model, proc, imgs, qs, max_new_tokens=4)
    keys = em.memory.route(images=imgs, texts=qs).keys
    assert em.memory.route(keys=keys).edit_ids.tolist() == [-1]
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    with torch.no_grad():
        out = em.generate(**inputs, route_keys=keys, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, bare)
    (kw,) = seen
    assert set(kw) == {*inputs, "max_new_tokens", "do_sample"}  # no routing argument leaks through
    assert all(kw[k] is v for k, v in inputs.items())  # the caller's own tensors: no copy, no rebuild


def test_mixed_batch_routes_as_route_does(wrapped):
    em, model, proc, img, eid = wrapped
    imgs = [shape_image((30, 200, 30), "rect"), img, shape_image((30, 30, 220), "tri")]
    qs = ["is there a green shape?", "what color is the shape?", "how many shapes are there?"]
    assert em.memory.route_ids(images=imgs, texts=qs).tolist() == [-1, eid, -1]
    assert [r.edit_id for r in em.retrieve(images=imgs, prompts=qs)] == [-1, eid, -1]
    kw = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        batch = em.generate(images=imgs, prompts=qs, **kw)
        alone = em.generate(images=imgs[:1], prompts=qs[:1], **kw)
    _, bare = bare_generate(model, proc, imgs[:1], qs[:1], **kw)
    assert torch.equal(alone.logits[0], bare.logits[0])
    assert (batch.logits[0][0] - bare.logits[0][0]).abs().max() < 1e-5
