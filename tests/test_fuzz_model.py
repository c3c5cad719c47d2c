"""EditedModel under hostile input, and refusing a saved directory made for another model or encoder."""

from __future__ import annotations

import copy
import json
import shutil
import types

import numpy as np
import pytest
import torch
from _fuzz_fixtures import CFG, memory_state, run_case, summarize
from _fuzz_model import encoder_cases, encoder_dir_cases, encoder_state, model_cases
from _memory_fixtures import HashKeyEncoder
from _model_fixtures import one_thread, same_state, shape_image, state_snapshot, tiny, tiny_encoder

from esg_memory.errors import EncoderMismatchError, FormatError, InvalidInputError, ModelMismatchError
from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel

Q = "what color is the shape?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model, proc = tiny("llava")
    snap = state_snapshot(model)
    em = EditedModel.wrap(model, proc, EditMemory(HashKeyEncoder(32), CFG))
    img = shape_image((220, 30, 30))
    a = em.add_edit(img, Q, "purple", tune="never")
    saved = tmp_path_factory.mktemp("em") / "saved"
    em.save(saved)
    return types.SimpleNamespace(em=em, model=model, proc=proc, snap=snap, img=img, a=a, saved=saved)


def test_model_catalogue_refused_and_nothing_changed(env, tmp_path):
    em = env.em
    before = em.answer([env.img], [Q], max_new_tokens=4)
    cases = model_cases(em, env.img, tmp_path)
    assert len(cases) > 40
    outcomes = [run_case(c, lambda: memory_state(em.memory)) for c in cases]
    bad = [f for s in summarize(outcomes).values() for f in s["failed"]]
    assert not bad, "\n".join(bad)
    assert same_state(env.model, env.snap), "the base model was modified"
    assert em.answer([env.img], [Q], max_new_tokens=4) == before


def test_saved_directory_reloads_for_the_same_model(env):
    em2 = EditedModel.wrap(env.model, env.proc, memory=env.saved, encoder=HashKeyEncoder(32))
    assert memory_state(em2.memory) == memory_state(env.em.memory)
    meta = json.loads((env.saved / "edited_model.json").read_text())
    assert meta["model_type"] == "llava" and len(meta["weights_probe"]) == 16


def test_same_weights_in_another_dtype_are_the_same_model(env):
    from esg_memory.model.identity import weights_probe

    half = copy.deepcopy(env.model).to(torch.bfloat16)
    saved = json.loads((env.saved / "edited_model.json").read_text())["weights_probe"]
    now = weights_probe(half)
    # the sample really differs (bfloat16 rounding): what lets the model in is the tolerance
    assert now != saved and np.allclose(now, saved, rtol=2e-2, atol=1e-5)
    em2 = EditedModel.wrap(half, env.proc, memory=env.saved, encoder=HashKeyEncoder(32))
    assert memory_state(em2.memory) == memory_state(env.em.memory)  # accepted, with the saved edits
    assert em2.retrieve(images=[env.img], prompts=[Q])[0].edit_id == env.a


def test_another_architecture_is_refused_naming_what_differs(env):
    qwen, qproc = tiny("qwen2_vl")
    with pytest.raises(ModelMismatchError) as ei:
        EditedModel.wrap(qwen, qproc, memory=env.saved, encoder=HashKeyEncoder(32))
    msg = str(ei.value)
    assert "model type 'llava' (saved) vs 'qwen2_vl' (given)" in msg and "architecture" in msg
    assert isinstance(ei.value, EncoderMismatchError)  # callers catching the older type still catch it


def test_same_architecture_other_weights_is_refused(env):
    from esg_memory.tiny import build_tiny

    torch.manual_seed(1)
    other, oproc = build_tiny("llava", seed=1)
    with pytest.raises(ModelMismatchError, match="another checkpoint"):
        EditedModel.wrap(other, oproc, memory=env.saved, encoder=HashKeyEncoder(32))
    # the escape hatch the message names: the memory alone, adapters recompiled for this model
    mem = EditMemory.load(env.saved / "memory", encoder=HashKeyEncoder(32))
    em = EditedModel.wrap(other, oproc, memory=mem)
    assert em.retrieve(images=[env.img], prompts=[Q])[0].edit_id == env.a


def test_from_pretrained_refuses_a_directory_saved_for_another_model(env):
    with pytest.raises(ModelMismatchError, match=r"model type|architecture"):
        EditedModel.from_pretrained("esg-easyvqa-llava", memory=env.saved, encoder=HashKeyEncoder(32))


def test_another_encoder_is_refused_naming_what_differs(env):
    with pytest.raises(EncoderMismatchError, match="dim") as ei:
        EditedModel.wrap(env.model, env.proc, memory=env.saved, encoder=HashKeyEncoder(16))
    assert not isinstance(ei.value, ModelMismatchError)
    with pytest.raises(EncoderMismatchError, match="name"):
        EditedModel.wrap(env.model, env.proc, memory=env.saved, encoder=HashKeyEncoder(32, name="other-enc"))


@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        "a list",
        "nested deep",
        "format_version text",
        "format_version newer",
        "model missing",
        "probe not numbers",
        "config not object",
        "adapters not object",
        "config unknown field",
        "foreign format",
    ],
)
def test_damaged_wrapper_metadata_is_refused(env, tmp_path, damage):
    d = tmp_path / "copy"
    shutil.copytree(env.saved, d)
    f = d / "edited_model.json"
    meta = json.loads(f.read_text())
    edits = {
        "format_version text": {"format_version": "1"},
        "format_version newer": {"format_version": 99},
        "model missing": {"model": None},
        "probe not numbers": {"weights_probe": ["a"]},
        "config not object": {"config": 5},
        "adapters not object": {"config": {"adapters": 5}},
        "config unknown field": {"config": {"bogus": 1}},
        "foreign format": {"format": "something"},
    }
    if damage == "not json":
        f.write_text("{not json")
    elif damage == "a list":
        f.write_text("[1, 2]")
    elif damage == "nested deep":
        f.write_text("[" * 100_000 + "]" * 100_000)
    else:
        meta.update(edits[damage])
        f.write_text(json.dumps(meta))
    with pytest.raises(FormatError):
        EditedModel.wrap(env.model, env.proc, memory=d, encoder=HashKeyEncoder(32))


def test_route_keys_of_a_foreign_encoder_dim_are_refused(env):
    with pytest.raises(InvalidInputError, match="shape"):
        env.em.generate(images=[env.img], prompts=[Q], route_keys=np.ones((1, 16)), max_new_tokens=2)


def test_clip_encoder_refuses_bad_rows_and_its_cache_stays_clean(tmp_path):
    enc = tiny_encoder()
    cases = encoder_cases(enc, tmp_path)
    outcomes = [run_case(c, lambda: encoder_state(enc)) for c in cases]
    bad = [f for s in summarize(outcomes).values() for f in s["failed"]]
    assert not bad, "\n".join(bad)


def test_damaged_encoder_directories_are_refused_and_no_pickle_runs(tmp_path):
    cases, marker = encoder_dir_cases(tmp_path)
    outcomes = [run_case(c, lambda: "") for c in cases]
    bad = [f for s in summarize(outcomes).values() for f in s["failed"]]
    assert not bad, "\n".join(bad)
    assert not marker.exists(), "a pickle in a weights file was executed"


def test_an_encoder_directory_without_weights_is_not_mistaken_for_the_trained_one(tmp_path):
    import shutil

    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.pretrained import pretrained_path

    d = tmp_path / "clip"
    shutil.copytree(pretrained_path("esg-easyvqa-clip"), d)
    (d / "open_clip_model.safetensors").unlink()
    random_enc, trained = ClipKeyEncoder(f"local-dir:{d}"), ClipKeyEncoder("esg-easyvqa-clip")
    assert "random" in random_enc.name and random_enc.name != trained.name  # a memory refuses it
