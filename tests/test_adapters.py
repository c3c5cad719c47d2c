"""Prefix adapters: compiled / soft / kv kinds, tuning with the base frozen, storage format and sizes."""

from __future__ import annotations

import struct

import pytest
import torch
from _model_fixtures import one_thread, same_state, shape_image, state_snapshot, tiny

from esg_memory.config import AdapterConfig
from esg_memory.errors import ConfigError, FormatError, TuningError
from esg_memory.model import (
    Adapter,
    AdapterRuntime,
    ModelSpec,
    adapter_bytes,
    get_family,
    soft_rank_for,
)

LLAVA_7B = ModelSpec("llava", num_layers=32, num_kv_heads=32, head_dim=128, hidden_size=4096,
                     vocab_size=32064)
QWEN2_VL_7B = ModelSpec("qwen2_vl", num_layers=28, num_kv_heads=4, head_dim=128, hidden_size=3584,
                        vocab_size=152064)
Q = "what color is the shape?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _runtime(model_type="llava", **cfg):
    model, proc = tiny(model_type)
    return AdapterRuntime(model, proc, get_family(model), AdapterConfig(**cfg))


def _answer(rt, adapter, image, prompt):
    fam, model, proc = rt.family, rt.model, rt.processor
    inputs = dict(fam.build_inputs(proc, [image], [prompt]))
    with torch.no_grad():
        out = model.generate(**fam.prefix_kwargs(model, inputs, [rt.kv(adapter)]), max_new_tokens=8,
                             do_sample=False)
    return fam.decode_answers(proc, out, inputs["input_ids"].shape[1])[0]


def test_compiled_is_token_ids_and_matches_statement_kv():
    rt = _runtime()
    a = rt.compile(3, 2, Q, "purple")
    assert a.kind == "compiled" and a.tensors == {}
    text = rt.processor.tokenizer.decode(a.token_ids)
    assert text == f"Question: {Q} Answer: purple.\n"
    kv = rt.kv(a)
    assert len(kv) == rt.spec.num_layers and kv[0][0].shape == (1, 2, a.length, 16)
    assert rt.kv(a) is kv and rt.hits == 1  # LRU hit
    back = Adapter.from_bytes(a.to_bytes())
    assert (back.kind, back.edit_id, back.version, back.model) == ("compiled", 3, 2, rt.fingerprint)
    assert torch.equal(back.token_ids, a.token_ids)
    assert a.stored_bytes() < 600  # token ids + a small header
    assert a.to_bytes() == rt.compile(3, 2, Q, "purple").to_bytes()  # canonical bytes: reproducible saves


def test_lru_evicts_and_forget():
    rt = _runtime(cache_size=1)
    a, b = rt.compile(1, 1, Q, "purple"), rt.compile(2, 1, Q, "teal")
    rt.kv(a)
    rt.kv(b)
    assert rt.misses == 2
    rt.kv(a)
    assert rt.misses == 3  # a was evicted by b
    rt.forget(1)
    rt.kv(a)
    assert rt.misses == 4


@pytest.mark.parametrize(("model_type", "kind"), [("llava", "soft"), ("qwen2_vl", "soft"), ("llava", "kv")])
def test_tuning_reaches_exact_target_with_base_frozen(model_type, kind):
    rt = _runtime(model_type, tuned_kind=kind)
    snap = state_snapshot(rt.model)
    img, img2 = shape_image((220, 30, 30)), shape_image((220, 30, 30), bg=(240, 240, 250))
    examples = [(img, Q), (img, "what is the color of the shape?"), (img2, Q)]
    base = rt.compile(7, 1, Q, "purple")
    assert _answer(rt, base, img, Q) != "purple"  # random tiny models cannot follow the statement
    tuned, report = rt.tune(base, examples, "purple")
    assert report.exact and report.min_margin >= rt.config.margin and report.n_examples == 3
    assert tuned.kind == kind and tuned.exact
    stored = Adapter.from_bytes(tuned.to_bytes())  # exactness holds for the stored (fp16) values
    assert stored.to_bytes() == tuned.to_bytes()
    assert all(t.dtype == torch.float16 for t in stored.tensors.values())
    for im, q in examples:
        assert _answer(rt, stored, im, q) == "purple"
    assert same_state(rt.model, snap)
    assert all(p.grad is None for p in rt.model.parameters())


def test_tuning_budget_exhausted_reports_not_exact():
    rt = _runtime(max_steps=1, margin=50.0)
    tuned, report = rt.tune(rt.compile(1, 1, Q, "purple"), [(shape_image((1, 2, 3)), Q)], "purple")
    assert not report.exact and report.steps == 1 and tuned.exact is False
    with pytest.raises(TuningError):
        rt.tune(rt.compile(1, 1, Q, "purple"), [], "purple")


def test_patience_ends_a_tuning_that_stopped_making_progress():
    # a learning rate too small to move the margin: no progress after the first step
    ex = [(shape_image((1, 2, 3)), Q)]
    stalled = _runtime(max_steps=12, margin=50.0, lr=1e-12, patience=3)
    tuned, report = stalled.tune(stalled.compile(1, 1, Q, "purple"), ex, "purple")
    assert not report.exact and report.steps == 3 and tuned.exact is False
    full = _runtime(max_steps=12, margin=50.0, lr=1e-12)
    assert full.tune(full.compile(1, 1, Q, "purple"), ex, "purple")[1].steps == 12
    # progress resets the count: a learning rate that moves the margin keeps going past the patience
    moving = _runtime(max_steps=12, margin=50.0, lr=0.3, tuned_kind="kv", patience=3)
    assert moving.tune(moving.compile(1, 1, Q, "purple"), ex, "purple")[1].steps > 3
    with pytest.raises(ConfigError):
        AdapterConfig(patience=0)


def test_soft_rank_and_bytes_at_7b_shapes():
    for spec in (LLAVA_7B, QWEN2_VL_7B):
        for p_len in (12, 20, 40):
            r = soft_rank_for(spec, p_len)
            assert r >= 1
            assert adapter_bytes(spec, p_len, "soft", rank=r) + 512 <= 64 * 1024
            assert adapter_bytes(spec, p_len, "compiled") == 4 * p_len
    assert soft_rank_for(LLAVA_7B, 20) == 7
    assert LLAVA_7B.kv_bytes_per_token(2) == 512 * 1024
    assert QWEN2_VL_7B.kv_bytes_per_token(2) == 56 * 1024
    # tiny model: the budget allows a full-rank delta
    rt = _runtime()
    assert rt.soft_rank(15) == 15
    assert soft_rank_for(LLAVA_7B, 20, AdapterConfig(soft_rank=2)) == 2


def test_reference_7b_configs_give_published_shapes():
    from esg_memory.model import reference_configs

    cfgs = reference_configs()
    assert get_family("llava").spec(cfgs["llava-1.5-7b"]) == LLAVA_7B
    assert get_family("qwen2_vl").spec(cfgs["qwen2-vl-7b"]) == QWEN2_VL_7B


def test_format_errors():
    rt = _runtime()
    data = rt.compile(1, 1, Q, "purple").to_bytes()
    for bad in (b"", b"garbage", data[:20], struct.pack("<Q", 10**9) + b"{}"):
        with pytest.raises(FormatError):
            Adapter.from_bytes(bad)
    from safetensors.torch import save

    foreign = save({"x": torch.zeros(2)}, metadata={"format": "other"})
    with pytest.raises(FormatError, match="not an esg-memory adapter"):
        Adapter.from_bytes(foreign)
    newer = save({"token_ids": torch.zeros(2, dtype=torch.int32)},
                 metadata={"format": "esg-memory-adapter", "format_version": "99", "kind": "compiled",
                           "edit_id": "1", "version": "1"})
    with pytest.raises(FormatError, match="newer"):
        Adapter.from_bytes(newer)


def test_config_validation():
    for bad in ({"statement_template": "no answer slot"}, {"tuned_kind": "lora"}, {"storage_dtype": "int8"},
                {"soft_rank": 0}, {"max_steps": 0}, {"lr": 0.0}, {"margin": -1.0}):
        with pytest.raises(ConfigError):
            AdapterConfig(**bad)
