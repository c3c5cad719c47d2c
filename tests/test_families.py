"""Family registry and prefix injection: a K/V prefix must behave exactly like prepended tokens."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from _model_fixtures import (
    CORE_FAMILIES,
    FAMILIES,
    one_thread,
    prepend_inputs,
    shape_image,
    tiny,
    trim_eos,
)

from esg_memory.errors import InvalidInputError, UnsupportedModelError
from esg_memory.model import families
from esg_memory.model.families import (
    get_family,
    register_family,
    supported_model_types,
)
from esg_memory.registry import Registry

STATEMENTS = ("Question: what color is the shape? Answer: purple.\n", "the capital of france is paris .")
PROMPTS = ("what color is the shape?", "which shape is in the image?", "is there a red shape?")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _images():
    return [shape_image((200, 30, 30)), shape_image((20, 200, 30), "rect"), shape_image((20, 20, 230), "tri")]


def _statement(model, proc, text):
    fam = get_family(model)
    ids = torch.tensor(proc.tokenizer(text, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        return ids, fam.statement_kv(model, input_ids=ids.unsqueeze(0))


def test_registry_and_unsupported():
    assert set(FAMILIES) <= set(supported_model_types())
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert"))
    with pytest.raises(UnsupportedModelError) as e:
        get_family(fake)
    for mt in FAMILIES:
        assert mt in str(e.value)
    with pytest.raises(UnsupportedModelError):
        get_family(object())
    with pytest.raises(InvalidInputError, match="already registered"):
        register_family(get_family("llava"))


def test_register_new_family_is_one_entry(monkeypatch):
    # a scratch copy of the registry, so the new entry does not outlive this test
    scratch = Registry(families.FAMILIES.kind, UnsupportedModelError)
    for name in families.FAMILIES:
        scratch.register(name, families.FAMILIES.get(name))
    monkeypatch.setattr(families, "FAMILIES", scratch)
    fam = dataclasses.replace(get_family("llava"), model_type="my_llava_variant")
    register_family(fam)
    assert get_family("my_llava_variant") is fam
    assert "my_llava_variant" in supported_model_types()
    register_family(dataclasses.replace(fam, answer_prefix=""), overwrite=True)  # replaced only when asked
    assert get_family("my_llava_variant").answer_prefix == ""


@pytest.mark.parametrize("model_type", FAMILIES)
def test_spec(model_type):
    model, _ = tiny(model_type)
    spec = get_family(model).spec(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size) == (2, 2, 16, 64)
    assert spec.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2
    assert model_type in spec.fingerprint()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prefix_equals_prepended_tokens(model_type):
    model, proc = tiny(model_type)
    fam = get_family(model)
    img, prompt = _images()[0], PROMPTS[0]
    ids, kv = _statement(model, proc, STATEMENTS[0])
    inputs = dict(fam.build_inputs(proc, [img], [prompt]))
    ref = prepend_inputs(inputs, ids)
    with torch.no_grad():
        want = model(**ref).logits[:, -1]
        got = model(**fam.prefix_kwargs(model, inputs, [kv])).logits[:, -1]
        assert (want - got).abs().max() < 1e-5
        g_ref = model.generate(**ref, max_new_tokens=6, do_sample=False)[:, ref["input_ids"].shape[1]:]
        kw = fam.prefix_kwargs(model, inputs, [kv])
        g = model.generate(**kw, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(g_ref, g)
    # a fresh cache each call: the same kwargs built again give the same result (generate grew the old one)
    assert kw["cache"].get_seq_length() > kv[0][0].shape[-2]
    with torch.no_grad():
        again = model(**fam.prefix_kwargs(model, inputs, [kv])).logits[:, -1]
    assert torch.equal(again, got)


@pytest.mark.parametrize("model_type", CORE_FAMILIES)
def test_mixed_batch_rows_match_single_rows(model_type):
    model, proc = tiny(model_type)
    fam = get_family(model)
    imgs = _images()
    kvs = [_statement(model, proc, s)[1] for s in STATEMENTS] + [None]
    tok = proc.tokenizer
    singles = []
    with torch.no_grad():
        for i in range(3):
            inp = dict(fam.build_inputs(proc, [imgs[i]], [PROMPTS[i]]))
            kw = fam.prefix_kwargs(model, inp, [kvs[i]]) if kvs[i] is not None else inp
            o = model.generate(**kw, max_new_tokens=5, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            singles.append((o.logits[0][0], o.sequences[0, inp["input_ids"].shape[1]:]))
        batch = dict(fam.build_inputs(proc, imgs, list(PROMPTS)))
        assert batch["attention_mask"][:, 0].min() == 0 or batch["attention_mask"].all()  # left padding
        kw = fam.prefix_kwargs(model, batch, kvs)
        pmax = max(k[0][0].shape[-2] for k in kvs[:2])
        assert kw["attention_mask"].shape[1] == batch["input_ids"].shape[1] + pmax
        o = model.generate(**kw, max_new_tokens=5, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    new = o.sequences[:, batch["input_ids"].shape[1]:]
    for i in range(3):
        assert (o.logits[0][i] - singles[i][0]).abs().max() < 1e-5
        assert trim_eos(new[i], tok.eos_token_id, tok.pad_token_id) == trim_eos(
            singles[i][1], tok.eos_token_id, tok.pad_token_id)


def test_prefix_kwargs_leaves_inputs_alone_and_validates():
    model, proc = tiny("qwen2_vl")
    fam = get_family(model)
    _, kv = _statement(model, proc, STATEMENTS[1])
    inputs = dict(fam.build_inputs(proc, _images()[:2], list(PROMPTS[:2])))
    before = {k: v.clone() for k, v in inputs.items()}
    kw = fam.prefix_kwargs(model, inputs, [kv, None])
    assert kw["position_ids"].shape == (3, 2, inputs["input_ids"].shape[1])
    assert set(inputs) == set(before) and all(torch.equal(inputs[k], before[k]) for k in before)
    with pytest.raises(InvalidInputError):
        fam.prefix_kwargs(model, inputs, [kv])
    with pytest.raises(InvalidInputError):
        fam.prefix_kwargs(model, inputs, [None, None])


def test_build_inputs_validation_and_text_only_rows():
    model, proc = tiny("llava")
    fam = get_family(model)
    with pytest.raises(InvalidInputError):
        fam.build_inputs(proc, None, [])
    with pytest.raises(InvalidInputError):
        fam.build_inputs(proc, [None], ["a", "b"])
    with pytest.raises(InvalidInputError):
        fam.build_inputs(proc, None, ["  "])
    side = proc.tokenizer.padding_side
    proc.tokenizer.padding_side = "right"
    try:
        inp = fam.build_inputs(proc, [shape_image((1, 2, 3)), None], ["what color is the shape?", "hi"])
        assert proc.tokenizer.padding_side == "right"  # restored
    finally:
        proc.tokenizer.padding_side = side
    assert inp["attention_mask"][1, 0] == 0  # left-padded text-only row
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2


@pytest.mark.parametrize("model_type", CORE_FAMILIES)
def test_prompt_formats(model_type):
    model, proc = tiny(model_type)
    fam = get_family(model)
    text = fam.format_prompt(proc, "what color is the shape?", has_image=True)
    assert "what color is the shape?" in text
    assert fam.image_placeholder.split(">")[0] in text or "<image>" in text
    ids = fam.target_ids(proc, "purple")
    assert ids[-1] == proc.tokenizer.eos_token_id
    assert proc.tokenizer.decode(ids[:-1]).strip() == "purple"
    assert fam.target_ids(proc, "purple", text) == ids  # boundary-aware ids agree on this tokenizer


@pytest.mark.parametrize("model_type", CORE_FAMILIES)
def test_text_only_row_next_to_image_row(model_type):
    model, proc = tiny(model_type)
    fam = get_family(model)
    imgs, prompts = [_images()[0], None], [PROMPTS[0], "the capital of france is"]
    kvs = [_statement(model, proc, s)[1] for s in STATEMENTS]
    with torch.no_grad():
        both = dict(fam.build_inputs(proc, imgs, prompts))
        batch = model(**fam.prefix_kwargs(model, both, kvs)).logits[:, -1]
        for i in range(2):
            one = dict(fam.build_inputs(proc, [imgs[i]], [prompts[i]]))
            alone = model(**fam.prefix_kwargs(model, one, [kvs[i]])).logits[:, -1]
            assert (batch[i] - alone[0]).abs().max() < 1e-5


def test_beam_search_and_several_sequences_match_prepended_tokens():
    model, proc = tiny("qwen2_vl")
    fam = get_family(model)
    ids, kv = _statement(model, proc, STATEMENTS[0])
    inputs = dict(fam.build_inputs(proc, [_images()[0]], [PROMPTS[0]]))
    ref = prepend_inputs(inputs, ids)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2,
          "do_sample": False}
    with torch.no_grad():
        want = model.generate(**ref, **kw)[:, ref["input_ids"].shape[1]:]
        got = model.generate(**fam.prefix_kwargs(model, inputs, [kv], cache_repeat=3), **kw)
    assert torch.equal(want, got[:, inputs["input_ids"].shape[1]:])
