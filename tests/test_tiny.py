"""Tiny offline models: seeded, deterministic, and reloadable with transformers' Auto classes."""

from __future__ import annotations

import pytest
import torch
from _model_fixtures import FAMILIES, one_thread, shape_image, tiny

from esg_memory.errors import ConfigError
from esg_memory.model import get_family
from esg_memory.tiny import TINY_BUILDERS, build_tiny, build_tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def test_tokenizer_specials_and_determinism():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert 300 <= len(a) <= 1000
    for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>"):
        assert a.convert_tokens_to_ids(t) != a.unk_token_id or t == "<unk>"
    q = build_tiny_tokenizer(qwen=True)
    for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>"):
        assert q.convert_tokens_to_ids(t) != q.unk_token_id
    text = "what color is the shape? purple"
    assert a.decode(a(text)["input_ids"]) == text
    assert a.padding_side == "left"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_build_save_reload_generate(model_type, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = build_tiny(model_type, out_dir=tmp_path, seed=0)
    assert model.config.model_type == model_type
    again, _ = TINY_BUILDERS[model_type](seed=0)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd), "same seed must give the same weights"
    other, _ = TINY_BUILDERS[model_type](seed=1)
    assert not all(torch.equal(sd[k], other.state_dict()[k]) for k in sd)

    fam = get_family(model)
    img = shape_image((200, 30, 30))
    inputs = fam.build_inputs(proc, [img], ["what color is the shape?"])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    m2 = AutoModelForImageTextToText.from_pretrained(tmp_path)
    p2 = AutoProcessor.from_pretrained(tmp_path)
    assert m2.config.model_type == model_type
    inputs2 = fam.build_inputs(p2, [img], ["what color is the shape?"])
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    assert torch.equal(out, m2.generate(**inputs2, max_new_tokens=4, do_sample=False))


def test_tiny_models_have_decisive_logits():
    # wide text init: greedy tokens are not near-ties, so equality tests are meaningful
    model, proc = tiny("llava")
    fam = get_family(model)
    inputs = fam.build_inputs(proc, [shape_image((10, 10, 200))], ["what color is the shape?"])
    with torch.no_grad():
        top = model(**inputs).logits[0, -1].topk(2).values
    assert float(top[0] - top[1]) > 1e-3
    assert float(top[0]) > 1.0


def test_unknown_builder():
    with pytest.raises(ConfigError, match="llava"):
        build_tiny("bert")
