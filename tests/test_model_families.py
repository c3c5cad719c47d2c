"""The wrapper on the remaining families (LLaVA-NeXT, Qwen2.5-VL), plus input-handling edge cases."""

from __future__ import annotations

import pytest
import torch
from _model_fixtures import bare_generate, one_thread, shape_image, tiny, tiny_encoder

from esg_memory.errors import InvalidInputError
from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel

Q = "what color is the shape?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.mark.parametrize("model_type", ["llava_next", "qwen2_5_vl"])
def test_edit_and_out_of_scope_on_more_families(model_type):
    model, proc = tiny(model_type)
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    img, other = shape_image((220, 30, 30)), shape_image((30, 200, 30), "rect")
    eid = em.add_edit(img, Q, "purple", tune="sync")
    assert em.tune_reports[eid].exact
    assert em.answer(images=[img], prompts=[Q]) == ["purple"]
    qs = ["is there a green shape?"]
    assert em.retrieve(images=[other], prompts=qs)[0].edit_id == -1
    _, bare = bare_generate(model, proc, [other], qs, max_new_tokens=5, output_logits=True,
                            return_dict_in_generate=True)
    with torch.no_grad():
        got = em.generate(images=[other], prompts=qs, max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    assert torch.equal(bare.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(bare.logits, got.logits, strict=True))


def test_input_edge_cases():
    model, proc = tiny("llava")
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    img = shape_image((220, 30, 30))
    inputs, bare = bare_generate(model, proc, [img], [Q], max_new_tokens=3)
    # empty memory: any call is the bare call, routing info or not
    with torch.no_grad():
        assert torch.equal(em.generate(**inputs, max_new_tokens=3, do_sample=False), bare)
    em.add_edit(img, Q, "purple", tune="never")
    with pytest.raises(InvalidInputError, match="not both"):
        em.generate(prompts=[Q], images=[img], input_ids=inputs["input_ids"])
    with pytest.raises(InvalidInputError, match="one entry per row"):
        em.generate(**inputs, route_texts=[Q, Q], max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="input_ids"):
        em.generate(inputs_embeds=torch.zeros(1, 3, 64), route_texts=[Q])
    with pytest.raises(InvalidInputError):
        em.retrieve()
    # single image / single prompt are accepted as one row; a tokenizer is never modified
    proc.tokenizer.padding_side = "right"
    try:
        out = em.answer(images=img, prompts=Q)
        assert proc.tokenizer.padding_side == "right"
    finally:
        proc.tokenizer.padding_side = "left"
    assert len(out) == 1
    r = em.retrieve(images=img, prompts=Q)[0]
    assert r.edit_id >= 0 and r.answer == "purple" and "routed to edit" in r.explanation


def test_half_precision_model_adapters_follow_dtype():
    import copy

    model, proc = tiny("llava")
    model = copy.deepcopy(model).to(torch.bfloat16)
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    img, other = shape_image((220, 30, 30)), shape_image((30, 200, 30), "rect")
    eid = em.add_edit(img, Q, "purple", tune="sync")
    assert em.tune_reports[eid].exact
    k, v = em.runtime.kv(em.adapter(eid))[0]
    assert k.dtype == v.dtype == torch.bfloat16 and k.device == model.device
    assert em.answer(images=[img], prompts=[Q]) == ["purple"]
    _, bare = bare_generate(model, proc, [other], ["is there a green shape?"], max_new_tokens=4)
    with torch.no_grad():
        got = em.generate(images=[other], prompts=["is there a green shape?"], max_new_tokens=4,
                          do_sample=False)
    assert torch.equal(bare, got)
    # the base is cast after wrapping: cached K/V follow the model's dtype instead of going stale
    em.to(torch.float32)
    assert em.runtime.kv(em.adapter(eid))[0][0].dtype == torch.float32
    assert em.answer(images=[img], prompts=[Q]) == ["purple"]


def test_bad_or_foreign_stored_adapters_are_recompiled(caplog):
    from esg_memory.model import Adapter

    model, proc = tiny("llava")
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    img = shape_image((220, 30, 30))
    eid = em.add_edit(img, Q, "purple", tune="never")
    good = em.memory.attachment(eid, "adapter")
    inputs, _ = bare_generate(model, proc, [img], [Q], max_new_tokens=1)
    with torch.no_grad():
        want = em(**inputs, route_images=[img], route_texts=[Q]).logits
    qwen_model, qwen_proc = tiny("qwen2_vl")
    qwen = EditedModel.wrap(qwen_model, qwen_proc, EditMemory(tiny_encoder()))
    foreign = qwen.runtime.compile(eid, 1, Q, "purple")
    for bad in (b"not safetensors", foreign.to_bytes()):
        em.memory.attach(eid, "adapter", bad)
        with torch.no_grad():
            got = em(**inputs, route_images=[img], route_texts=[Q]).logits
        assert torch.equal(got, want)
        # recompiled into this process's cache; the read left the stored bytes as they were
        assert em.memory.attachment(eid, "adapter") == bad
        assert em.adapter(eid).model == em.runtime.fingerprint
    # a writer repairs them: wrapping the memory again (a load that can write) stores a usable one
    EditedModel.wrap(model, proc, em.memory)
    again = Adapter.from_bytes(em.memory.attachment(eid, "adapter"))
    assert again.model == em.runtime.fingerprint
    assert torch.equal(again.token_ids, Adapter.from_bytes(good).token_ids) and again.kind == "compiled"
    assert "recompiling" in caplog.text
