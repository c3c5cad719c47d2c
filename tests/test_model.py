"""EditedModel on tiny LLaVA and tiny Qwen2-VL with the real EditMemory and the tiny CLIP key encoder."""

from __future__ import annotations

import types

import pytest
import torch
from _model_fixtures import (
    CORE_FAMILIES,
    bare_answers,
    bare_generate,
    one_thread,
    same_state,
    shape_image,
    state_snapshot,
    tiny,
    tiny_encoder,
    trim_eos,
)

from esg_memory.errors import ConfigError, EncoderMismatchError, InvalidInputError, UnsupportedModelError
from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel

Q_COLOR = "what color is the shape?"
Q_SHAPE = "which shape is in the image?"
Q_OTHER = "is there a green shape?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _cases():
    return types.SimpleNamespace(
        a_img=shape_image((220, 30, 30), "circle"),
        a_img2=shape_image((220, 30, 30), "circle", bg=(250, 250, 240)),
        b_img=shape_image((30, 30, 220), "tri"),
        c_img=shape_image((30, 200, 30), "rect"),
    )


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def env(request):
    model, proc = tiny(request.param)
    snap = state_snapshot(model)
    c = _cases()
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    positives = ["what is the color of the shape?", (c.a_img2, None)]
    a = em.add_edit(c.a_img, Q_COLOR, "purple", positives=positives, tune="sync")
    b = em.add_edit(c.b_img, Q_SHAPE, "hexagon", tune="sync")
    return types.SimpleNamespace(em=em, model=model, proc=proc, a=a, b=b, snap=snap, c=c)


def _logits(em_or_model, inputs, **route):
    with torch.no_grad():
        return em_or_model(**inputs, **route).logits if route else em_or_model(**inputs).logits


def test_tuned_edit_generates_target_on_input_and_positives(env):
    em, c = env.em, env.c
    assert em.tune_reports[env.a].exact and em.tune_reports[env.b].exact
    assert em.memory.get(env.a).positives, "positives are stored with the edit"
    rows = [(c.a_img, Q_COLOR), (c.a_img, "what is the color of the shape?"), (c.a_img2, Q_COLOR)]
    for img, q in rows:
        assert em.retrieve(images=[img], prompts=[q])[0].edit_id == env.a
    got = em.answer(images=[r[0] for r in rows], prompts=[r[1] for r in rows], max_new_tokens=8)
    assert got == ["purple"] * 3
    assert em.answer(images=[c.b_img], prompts=[Q_SHAPE], max_new_tokens=8) == ["hexagon"]
    # what the bare model says there is something else: the edit changed the answer
    assert bare_answers(env.model, env.proc, [c.a_img], [Q_COLOR]) != ["purple"]


def test_out_of_scope_is_bit_identical_to_bare(env):
    em, c = env.em, env.c
    imgs, qs = [c.c_img, c.b_img], [Q_OTHER, "does the image contain a circle?"]
    assert all(r.edit_id == -1 for r in em.retrieve(images=imgs, prompts=qs))
    inputs, bare = bare_generate(
        env.model, env.proc, imgs, qs, max_new_tokens=5, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        wrapped = em.generate(
            images=imgs,
            prompts=qs,
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        fwd = em.forward(images=imgs, prompts=qs).logits
        bare_fwd = env.model(**inputs).logits
    assert torch.equal(bare.sequences, wrapped.sequences)
    assert all(torch.equal(x, y) for x, y in zip(bare.logits, wrapped.logits, strict=True))
    assert torch.equal(fwd, bare_fwd)
    with torch.no_grad():  # sampling too: routing consumes no torch randomness
        torch.manual_seed(3)
        s_bare = env.model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=2.0)
        torch.manual_seed(3)
        s_wrap = em.generate(images=imgs, prompts=qs, max_new_tokens=5, do_sample=True, temperature=2.0)
    assert torch.equal(s_bare, s_wrap)
    assert em.answer(images=imgs, prompts=qs, max_new_tokens=8) == bare_answers(env.model, env.proc, imgs, qs)


def test_mixed_batch_equals_rows_alone(env):
    em, c, tok = env.em, env.c, env.proc.tokenizer
    imgs, qs = [c.a_img, c.b_img, c.c_img], [Q_COLOR, Q_SHAPE, Q_OTHER]
    assert [r.edit_id for r in em.retrieve(images=imgs, prompts=qs)] == [env.a, env.b, -1]
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        batch = em.generate(images=imgs, prompts=qs, **kw)
        singles = [em.generate(images=[i], prompts=[q], **kw) for i, q in zip(imgs, qs, strict=True)]
    n_in = batch.sequences.shape[1] - len(batch.logits)
    for row, single in enumerate(singles):
        s_in = single.sequences.shape[1] - len(single.logits)
        assert (batch.logits[0][row] - single.logits[0][0]).abs().max() < 1e-5
        assert trim_eos(batch.sequences[row, n_in:], tok.eos_token_id, tok.pad_token_id) == trim_eos(
            single.sequences[0, s_in:], tok.eos_token_id, tok.pad_token_id
        )
    # the out-of-scope row alone took the bare path
    _, bare = bare_generate(
        env.model,
        env.proc,
        [c.c_img],
        [Q_OTHER],
        max_new_tokens=4,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(bare.logits[0], singles[2].logits[0])


def test_delete_restores_bare_at_once(env):
    em = env.em
    img, q = shape_image((240, 200, 10), "tri"), "what color is the triangle?"
    inputs, _ = bare_generate(env.model, env.proc, [img], [q], max_new_tokens=1)
    bare = _logits(env.model, inputs)
    d = em.add_edit(img, q, "teal", tune="never")
    assert em.retrieve(images=[img], prompts=[q])[0].edit_id == d
    assert not torch.equal(_logits(em, inputs, route_images=[img], route_texts=[q]), bare)
    em.memory.delete(d)  # through the memory directly: the very next call sees it
    assert torch.equal(_logits(em, inputs, route_images=[img], route_texts=[q]), bare)


def test_revise_switches_answer_and_add_through_memory_compiles_lazily(env):
    em = env.em
    img, q = shape_image((120, 60, 10), "rect"), "what color is the rectangle?"
    e = em.memory.add(image=img, question=q, answer="gray")  # no adapter yet
    assert em.memory.attachment(e, "adapter") is None
    em.answer(images=[img], prompts=[q])
    # compiled on first use into this process's cache only: a read never writes to the memory
    assert em.memory.attachment(e, "adapter") is None and em.adapter(e).kind == "compiled"
    em.tune_edit(e)
    assert em.memory.attachment(e, "adapter") is not None  # a write: the tuned adapter is stored
    assert em.answer(images=[img], prompts=[q]) == ["gray"]
    v = em.revise_edit(e, answer="white", tune="sync")
    assert v == 2 and em.answer(images=[img], prompts=[q]) == ["white"]
    em.memory.rollback(e, 1)  # the v1 tuned adapter comes back with the rollback
    assert em.answer(images=[img], prompts=[q]) == ["gray"]
    em.delete_edit(e)


def test_disable_edits_and_route_keys(env):
    em, c = env.em, env.c
    inputs, bare = bare_generate(env.model, env.proc, [c.a_img], [Q_COLOR], max_new_tokens=8)
    with em.disable_edits():
        off = em.generate(images=[c.a_img], prompts=[Q_COLOR], max_new_tokens=8, do_sample=False)
        assert torch.equal(off, bare)
        assert torch.equal(_logits(em, inputs), _logits(env.model, inputs))  # no routing info needed
    keys = em.memory.route(images=[c.a_img], texts=[Q_COLOR]).keys
    with torch.no_grad():
        by_keys = em.generate(**inputs, route_keys=keys, max_new_tokens=8, do_sample=False)
        by_inputs = em.generate(images=[c.a_img], prompts=[Q_COLOR], max_new_tokens=8, do_sample=False)
    assert torch.equal(by_keys, by_inputs) and not torch.equal(by_keys, bare)


def test_sampling_streaming_and_passthrough(env):
    from transformers.generation.streamers import BaseStreamer

    em, c = env.em, env.c

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append(None)

    s = Collect()
    with torch.no_grad():
        out = em.generate(images=[c.a_img], prompts=[Q_COLOR], max_new_tokens=3, do_sample=False, streamer=s)
        torch.manual_seed(0)
        samp = em.generate(
            images=[c.a_img],
            prompts=[Q_COLOR],
            max_new_tokens=3,
            do_sample=True,
            num_return_sequences=3,
            temperature=1.5,
        )
    streamed = [t for ch in s.chunks[1:-1] for t in ch]
    assert s.chunks[-1] is None and streamed == out[0, len(s.chunks[0]) :].tolist()
    assert samp.shape[0] == 3
    with torch.no_grad():  # beam search on an edited row: the wrapper expands the prefix cache per beam
        beams = em.generate(
            images=[c.a_img], prompts=[Q_COLOR], max_new_tokens=8, num_beams=2, do_sample=False
        )
    n_in = em.build_inputs([c.a_img], [Q_COLOR])["input_ids"].shape[1]
    assert env.proc.tokenizer.decode(beams[0, n_in:], skip_special_tokens=True).strip() == "purple"
    # peft-style passthrough to the base model
    assert em.config is env.model.config and em.num_parameters() == env.model.num_parameters()
    assert em.device == env.model.device


def test_save_and_load_give_identical_outputs(env, tmp_path):
    em, c = env.em, env.c
    imgs, qs = [c.a_img, c.b_img, c.c_img], [Q_COLOR, Q_SHAPE, Q_OTHER]
    em.save(tmp_path / "saved")
    fresh = EditedModel.wrap(env.model, env.proc, memory=tmp_path / "saved", encoder=tiny_encoder())
    assert fresh.adapter(env.a).kind == em.adapter(env.a).kind != "compiled"  # tuned adapter came back
    with torch.no_grad():
        a = em.generate(
            images=imgs,
            prompts=qs,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        b = fresh.generate(
            images=imgs,
            prompts=qs,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


def test_from_pretrained_local_dir(env, tmp_path):
    env.em.save(tmp_path / "mem")
    env.model.save_pretrained(tmp_path / "model")
    env.proc.save_pretrained(tmp_path / "model")
    em = EditedModel.from_pretrained(tmp_path / "model", memory=tmp_path / "mem", encoder=tiny_encoder())
    assert em.answer(images=[env.c.a_img], prompts=[Q_COLOR]) == ["purple"]
    # that wrapper knows its base by directory: the saved directory alone reloads it
    em.save(tmp_path / "again")
    alone = EditedModel.from_pretrained(tmp_path / "again", encoder=tiny_encoder())
    assert alone.answer(images=[env.c.a_img], prompts=[Q_COLOR]) == ["purple"]
    # a model built in memory has no id or directory to reload from: the error says what to pass
    with pytest.raises(ConfigError, match="pass the base model"):
        EditedModel.from_pretrained(tmp_path / "mem", encoder=tiny_encoder())


def test_typed_errors(env):
    em, c = env.em, env.c
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert"))
    with pytest.raises(UnsupportedModelError, match="llava"):
        EditedModel.wrap(fake, env.proc, em.memory)

    other = types.SimpleNamespace(name="other", dim=tiny_encoder().dim + 1)
    with pytest.raises(EncoderMismatchError):
        EditedModel.wrap(env.model, env.proc, em.memory, encoder=other)
    inputs, _ = bare_generate(env.model, env.proc, [c.a_img], [Q_COLOR], max_new_tokens=1)
    with pytest.raises(InvalidInputError, match="route"):
        em.generate(**inputs, max_new_tokens=1)
    with pytest.raises(InvalidInputError):
        em.generate(images=[c.a_img], max_new_tokens=1)
    with pytest.raises(InvalidInputError):
        em.add_edit(c.a_img, Q_COLOR, "x", tune="later")
    n = len(em.memory)
    with pytest.raises(InvalidInputError):
        em.add_edit(c.a_img, Q_COLOR, "   ")
    assert len(em.memory) == n


def test_background_tuning_swaps_in_and_discards_stale(env, monkeypatch):
    em = env.em
    img, q = shape_image((90, 10, 160), "circle"), "what color is the circle?"
    e = em.add_edit(img, q, "orange", tune="background")
    reports = em.wait_for_tuning(timeout=120)
    assert [r.edit_id for r in reports] == [e] and reports[0].exact
    assert em.adapter(e).kind == reports[0].kind != "compiled"
    assert em.answer(images=[img], prompts=[q]) == ["orange"]

    real_tune = em.runtime.tune

    def tune_then_revise(*args, **kwargs):
        out = real_tune(*args, **kwargs)
        em.memory.revise(e, answer="brown")  # the edit moves on while tuning runs
        return out

    monkeypatch.setattr(em.runtime, "tune", tune_then_revise)
    em.tune_edit(e, background=True)
    em.wait_for_tuning(timeout=120)
    assert em.memory.get(e).version == 2
    assert em.memory.attachment(e, "adapter", version=2) is None  # the stale v1 result was not attached to v2
    assert em.adapter(e).kind == "compiled"
    em.delete_edit(e)


def test_base_model_untouched(env):
    assert same_state(env.model, env.snap)
    assert all(p.grad is None for p in env.model.parameters())


def test_module_calls_return_the_wrapper_with_its_edits(env):
    # `em = em.to(...)` must not hand back the bare model (and drop every edit)
    em, c = env.em, env.c
    try:
        calls = (lambda m: m.to("cpu"), lambda m: m.eval(), lambda m: m.cpu(), lambda m: m.to(torch.float64))
        for call in calls:
            got = call(em)
            assert got is em and isinstance(got, EditedModel)
        assert env.model.dtype == torch.float64
        # cast, the edit still fires and answers (K/V prefixes are cached per device and dtype)
        assert em.answer(images=[c.a_img], prompts=[Q_COLOR], max_new_tokens=8) == ["purple"]
    finally:
        assert em.float() is em  # float32 -> float64 -> float32 is exact: the shared model is unchanged
    assert env.model.dtype == torch.float32
    assert em.answer(images=[c.a_img], prompts=[Q_COLOR], max_new_tokens=8) == ["purple"]
    from esg_memory.tiny import build_tiny

    model, proc = build_tiny("llava", seed=0)  # lossy casts on a model of its own (tiny() is shared)
    other = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()))
    assert other.half() is other and model.dtype == torch.float16
    assert other.bfloat16() is other and model.dtype == torch.bfloat16
