"""The peft-like surface of `EditedModel`: ``save_pretrained`` / ``from_pretrained``, moves that take the key
encoder along without casting it, and multi-turn ``messages=`` with the model's chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_fixtures import one_thread, shape_image, tiny, tiny_encoder

from esg_memory.config import EditedModelConfig
from esg_memory.errors import ConfigError, InvalidInputError
from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel

Q = "what color is the shape?"
NEVER = EditedModelConfig(tune="never")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


# ------------------------------------------------------------------------------------ save_pretrained


def test_save_pretrained_then_from_pretrained_alone(tmp_path):
    from esg_memory.loading import load_base_model, load_encoder

    base, proc = load_base_model("tiny-llava")
    em = EditedModel.wrap(base, proc, EditMemory(load_encoder("esg-easyvqa-clip")), config=NEVER)
    img = shape_image((220, 30, 30))
    eid = em.add_edit(img, Q, "purple")
    em.save_pretrained(tmp_path / "saved")
    again = EditedModel.from_pretrained(tmp_path / "saved")  # base, encoder and config from the directory
    assert [e.id for e in again.memory.list()] == [eid] and again.edit_config.tune == "never"
    assert again.retrieve(images=[img], prompts=[Q])[0].edit_id == eid
    with torch.no_grad():
        a = em.forward(images=[img], prompts=[Q]).logits
        b = again.forward(images=[img], prompts=[Q]).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ device and dtype


def _own_model():
    from esg_memory.tiny import build_tiny

    return build_tiny("llava", seed=0)  # casts below must not touch the shared cached model


def test_a_cast_leaves_the_key_encoder_in_float32_and_keys_unchanged():
    from esg_memory.encoders import ClipKeyEncoder

    model, proc = _own_model()
    enc = ClipKeyEncoder("esg-tiny-clip")
    em = EditedModel.wrap(model, proc, EditMemory(enc), config=NEVER)
    img, other = shape_image((220, 30, 30)), shape_image((30, 30, 220), "tri")
    em.add_edit(img, Q, "purple")
    rows = {"images": [img, other, img], "texts": [Q, Q, "which shape is it?"]}
    enc.clear_cache()  # every key computed in the same batches before and after
    before = em.memory.route(**rows)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        assert cast(em) is em
        assert model.dtype in (torch.bfloat16, torch.float16)
        assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
        assert enc.device == torch.device("cpu")
        enc.clear_cache()  # the keys are computed again, by the encoder as it is now
        after = em.memory.route(**rows)
        assert np.array_equal(after.scores, before.scores) and np.array_equal(after.edit_ids, before.edit_ids)
        assert np.array_equal(after.keys, before.keys)


def test_moves_take_the_encoder_along(monkeypatch):
    model, proc = _own_model()
    seen = []

    class Spy:
        name, dim = tiny_encoder().name, tiny_encoder().dim

        def encode(self, images, texts):
            return tiny_encoder().encode(images, texts)

        def encode_images(self, images):
            return tiny_encoder().encode_images(images)

        def encode_texts(self, texts):
            return tiny_encoder().encode_texts(texts)

        def to(self, device):
            seen.append(device)
            return self

    em = EditedModel.wrap(model, proc, EditMemory(Spy()), config=NEVER)
    # no GPU here: the base model's own moves are stubbed, what reaches the encoder is the point
    for name in ("to", "cuda", "cpu"):
        monkeypatch.setattr(model, name, lambda *a, **k: model)
    assert em.to("cuda:1") is em and em.cuda() is em and em.cuda(2) is em and em.cpu() is em
    assert em.to(device="meta") is em and em.to(torch.zeros(1, device="meta")) is em
    assert em.to(torch.float16) is em and em.to(dtype=torch.bfloat16) is em and em.half() is em
    assert seen == ["cuda:1", "cuda", torch.device("cuda", 2), "cpu", "meta", torch.device("meta")]


def test_encoders_move_and_keep_their_dtype():
    from esg_memory.encoders import ClipKeyEncoder, CompositeKeyEncoder

    enc = ClipKeyEncoder("esg-tiny-clip")
    assert enc.to("cpu") is enc and enc.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="bad device"):
        enc.to("warp-drive")
    enc.to("meta")  # no tensor data: a device that is not the CPU, without a GPU
    assert {p.device.type for p in enc.model.parameters()} == {"meta"} and enc.device.type == "meta"
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    text, image = ClipKeyEncoder("esg-tiny-clip"), ClipKeyEncoder("esg-tiny-clip")
    both = CompositeKeyEncoder(text, image)
    assert both.to("meta") is both and text.device.type == image.device.type == "meta"


# ------------------------------------------------------------------------------------ messages=


def _bare_templated(model, proc, conv, images, **kw):
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=images, text=[text], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, **kw)


@pytest.fixture(scope="module")
def qwen():
    model, proc = tiny("qwen2_vl")  # a tiny model with a chat template
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()), config=NEVER)
    # other: a picture far from the edit's under the random tiny CLIP (the edit's question does not reach it)
    img, other = shape_image((220, 30, 30)), shape_image((255, 255, 0), "tri", bg=(0, 0, 80))
    eid = em.add_edit(img, Q, "purple")
    return em, model, proc, img, other, eid


def _turns(first_image: bool, question: str, n_images: int = 1):
    head = [{"type": "image"}] * n_images if first_image else []
    return [
        {"role": "user", "content": [*head, {"type": "text", "text": "describe the picture"}]},
        {"role": "assistant", "content": "a shape on white"},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]


def test_an_out_of_scope_conversation_is_the_bare_model_on_the_templated_input(qwen):
    em, model, proc, img, _, _ = qwen
    conv = _turns(True, "is there a green shape?")
    assert em.retrieve(images=[img], prompts=["is there a green shape?"])[0].edit_id == -1
    kw = {"max_new_tokens": 4, "output_logits": True, "return_dict_in_generate": True}
    bare = _bare_templated(model, proc, conv, [img], **kw)
    with torch.no_grad():
        got = em.generate(messages=conv, images=[img], do_sample=False, **kw)
    assert torch.equal(got.sequences, bare.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, bare.logits, strict=True))


def test_a_follow_up_about_an_earlier_picture_reaches_its_edit(qwen):
    em, model, proc, img, other, _ = qwen
    kw = {"max_new_tokens": 4, "do_sample": False}

    def by_hand(conv, images, route_image):
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        enc = proc(images=images, text=[text], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            return em.generate(**enc, route_images=[route_image], route_texts=[Q], **kw)

    conv = _turns(True, Q)  # the image is in the first turn, the edited question in the last
    with torch.no_grad():
        got = em.generate(messages=conv, images=[img], **kw)
    assert torch.equal(got, by_hand(conv, [img], img))
    assert not torch.equal(got, _bare_templated(model, proc, conv, [img], max_new_tokens=4))  # edited
    # the last image counts: shown the other picture first (inline), then the edited one
    assert em.retrieve(images=[other], prompts=[Q])[0].edit_id == -1
    two = [
        {"role": "user", "content": [{"type": "image", "image": other}, {"type": "text", "text": "this?"}]},
        {"role": "assistant", "content": "a rectangle"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
    ]
    plain = [{**two[0], "content": [{"type": "image"}, {"type": "text", "text": "this?"}]}, *two[1:]]
    with torch.no_grad():
        got = em.generate(messages=two, images=[img], **kw)
    assert torch.equal(got, by_hand(plain, [other, img], img))
    assert not torch.equal(got, by_hand(plain, [other, img], other))
    # a batch of conversations: each row as alone
    convs = [conv, _turns(True, "is there a green shape?")]
    batch = em.answer(messages=convs, images=[[img], [img]], max_new_tokens=4)
    assert batch == [em.answer(messages=c, images=[img], max_new_tokens=4)[0] for c in convs]


def test_bad_conversations_are_refused(qwen):
    em, _, _, img, _, _ = qwen
    ok = _turns(True, Q)
    cases = {
        "ends with the assistant": (ok[:2], [img]),
        "an image item without an image": (ok, None),
        "more images than items": (ok, [img, img]),
        "unknown role": ([{"role": "robot", "content": "hi"}], None),
        "bad item": ([{"role": "user", "content": [{"type": "video"}]}], None),
        "empty": ([], None),
        "not turns": (["hello"], None),
    }
    for name, (conv, images) in cases.items():
        try:
            em.generate(messages=conv, images=images, max_new_tokens=1)
        except InvalidInputError:
            continue
        pytest.fail(f"{name}: accepted")
    with pytest.raises(InvalidInputError, match="messages"):
        em.generate(messages=ok, images=[img], prompts=[Q], max_new_tokens=1)


def test_without_a_chat_template_a_single_turn_is_the_prompts_path():
    model, proc = tiny("llava")  # the random tiny LLaVA's processor has no chat template
    em = EditedModel.wrap(model, proc, EditMemory(tiny_encoder()), config=NEVER)
    img = shape_image((220, 30, 30))
    em.add_edit(img, Q, "purple")
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}]
    with torch.no_grad():
        a = em.generate(messages=one, images=[img], max_new_tokens=4, do_sample=False)
        b = em.generate(images=[img], prompts=[Q], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
    with pytest.raises(InvalidInputError, match="chat template"):
        em.generate(messages=_turns(True, Q), images=[img], max_new_tokens=1)
