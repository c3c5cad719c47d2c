"""The shipped default models (esg-easyvqa-clip, esg-easyvqa-llava): offline loading, recorded answers,
an encoder that knows same-subject pictures from different-subject ones.

Fixtures: ``tests/fixtures/easyvqa/`` holds a few pictures and questions from easy-vqa's *test* split
(PyPI ``easy-vqa`` 1.0, MIT), so these tests need neither the dataset package nor /work/shared.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from esg_memory import pretrained as P
from esg_memory.errors import ConfigError, FormatError

FIX = Path(__file__).resolve().parent / "fixtures" / "easyvqa"
CASES = json.loads((FIX / "cases.json").read_text(encoding="utf-8"))


def _image(name: str) -> Image.Image:
    return Image.open(FIX / name).convert("RGB")


def _safetensors_dtypes(path: Path) -> set[str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


# ---------------------------------------------------------------------------------------- registry
def test_names_resolve_to_shipped_directories():
    assert P.list_pretrained() == [P.EASYVQA_CLIP, P.EASYVQA_LLAVA, P.SCENES_CLIP, P.SCENES_LLAVA]
    for name in P.PRETRAINED_NAMES:
        d = P.pretrained_path(name)
        assert d.is_dir() and d.name == name
        assert P.is_pretrained_name(name)
    assert not P.is_pretrained_name("esg-tiny-clip")
    assert not P.is_pretrained_name(None)


def test_name_tables_are_one_registry_mechanism():
    from esg_memory.encoders import list_encoders
    from esg_memory.encoders.composite import ENCODERS
    from esg_memory.loading import MODEL_SPECS, list_model_specs, load_base_model, register_model_spec
    from esg_memory.registry import Registry

    assert isinstance(P.PRETRAINED, Registry) and P.PRETRAINED.names() == list(P.PRETRAINED_NAMES)
    assert isinstance(ENCODERS, Registry) and ENCODERS.names() == list_encoders()
    assert isinstance(MODEL_SPECS, Registry) and MODEL_SPECS.names() == list_model_specs()
    assert {"tiny-llava", "esg-easyvqa-llava", "esg-scenes-llava", "tiny-random-llava"} <= set(
        list_model_specs()
    )
    assert {"esg-easyvqa-clip", "esg-scenes-clip"} <= set(list_encoders())

    class Fake:
        def eval(self):
            return self

    first, second = Fake(), Fake()
    register_model_spec("test-registry-fake", lambda: (first, "processor"))
    assert load_base_model("test-registry-fake") == (first, "processor")
    # a model spec registered again points at the new factory, as before the shared mechanism
    register_model_spec("test-registry-fake", lambda: (second, "processor"))
    assert load_base_model("test-registry-fake")[0] is second
    for bad in ("", None, 3):
        with pytest.raises(ConfigError):
            register_model_spec(bad, lambda: (first, None))


@pytest.mark.parametrize("bad", ["nope", "", "ViT-B-32", "../esg-easyvqa-clip"])
def test_unknown_name_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="unknown pretrained model"):
        P.pretrained_path(bad)


def test_shipped_files_are_small_fp16_data():
    total = 0
    for name in P.PRETRAINED_NAMES:
        d = P.pretrained_path(name)
        files = [f for f in d.rglob("*") if f.is_file()]
        assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl")], "no pickles shipped"
        total += sum(f.stat().st_size for f in files)
        (w,) = [f for f in files if f.suffix == ".safetensors"]
        assert _safetensors_dtypes(w) == {"F16"}
    assert total < 20 * 2**20  # the bound for everything shipped


def test_training_record():
    clip, llava = P.pretrained_info(P.EASYVQA_CLIP), P.pretrained_info(P.EASYVQA_LLAVA)
    assert clip["format_version"] == 1 and clip["name"] == P.EASYVQA_CLIP
    assert 0.0 <= clip["figures"]["retrieval_top1_test"] <= 1.0
    assert llava["prompt_template"] == P.PROMPT_TEMPLATE
    assert 0.0 <= llava["figures"]["test_accuracy"] <= 1.0
    assert llava["train_seconds"] > 0 and llava["seed"] == clip["seed"]
    sc, sl = P.pretrained_info(P.SCENES_CLIP), P.pretrained_info(P.SCENES_LLAVA)
    assert sc["script"] == sl["script"] == "scripts/train_scenes_models.py"
    assert 0.0 <= sc["figures"]["nn_same_subject_held_out_renderings"] <= 1.0
    held = sl["figures"]["renderings_and_phrasings"]["held_out"]
    assert 0.0 <= held["accuracy"] <= 1.0 and set(held["by_kind"]) == {"attribute", "count", "yesno"}
    # both models of the world trained within the hour on this machine's one thread
    assert sc["train_seconds"] + sl["train_seconds"] < 3600


def test_format_prompt():
    want = "USER: <image>\nwhat color is the shape? ASSISTANT:"
    assert P.format_prompt(" what color is the shape? ") == want
    for bad in ("", "   ", None, 3):
        with pytest.raises(ConfigError):
            P.format_prompt(bad)


def test_caption():
    assert P.caption("circle", "red") == "a red circle"
    with pytest.raises(ConfigError):
        P.caption("hexagon", "red")
    with pytest.raises(ConfigError):
        P.caption("circle", "purple")


# ---------------------------------------------------------------------------------------- subjects
def test_derive_subjects_combines_answers():
    qs = [
        "what shape is in the image?",  # 1: shape only
        "is there not a red shape?",  # 1: not red... (answer "yes" below)
        "what is the blue shape?",  # 2: colour from the question, shape from the answer
        "does the image contain a circle?",  # 3: shape by elimination: not a circle ...
        "is no triangle present?",  # 3: ... and "is no triangle present? no" -> a triangle
        "what color is the rectangle?",  # 4: both
        "is there a green shape?",  # 5: only "not green": undetermined
    ]
    ans = ["circle", "yes", "triangle", "no", "no", "teal", "no"]
    ids = [1, 1, 2, 3, 3, 4, 5]
    got = P.derive_subjects(qs, ans, ids)
    assert got == {
        1: ("circle", None),
        2: ("triangle", "blue"),
        3: ("triangle", None),
        4: ("rectangle", "teal"),
        5: (None, None),
    }


def test_derive_subjects_rejects_ragged_input():
    with pytest.raises(ConfigError):
        P.derive_subjects(["what shape is present?"], [], [1])


def test_derive_subjects_matches_fixture_labels():
    rows = CASES["encoder"]
    for r in rows:
        assert r["shape"] in P.EASYVQA_SHAPES and r["colour"] in P.EASYVQA_COLOURS


# ---------------------------------------------------------------------------------------- LLaVA
@pytest.fixture(scope="module")
def llava():
    return P.load_easyvqa_llava()


def test_llava_loads_offline_in_float32(llava):
    import torch

    model, processor = llava
    assert model.config.model_type == "llava"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 2_000_000
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_chat_template_renders_the_training_prompt(llava):
    from esg_memory.model import get_family

    _, processor = llava
    q = "what is the color of the shape?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    rendered = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == P.format_prompt(q)
    # the wrapper formats prompts through the family, which prefers the chat template
    assert get_family("llava").format_prompt(processor, q, True) == P.format_prompt(q)


def _answer(llava, images, questions):
    import torch

    model, processor = llava
    enc = processor(
        text=[P.format_prompt(q) for q in questions], images=images, return_tensors="pt", padding=True
    )
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    new = out[:, enc["input_ids"].shape[1] :]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def test_llava_answers_held_out_questions_as_recorded(llava):
    rows = CASES["llava"]
    got = _answer(llava, [_image(r["image"]) for r in rows], [r["question"] for r in rows])
    assert got == [r["recorded"] for r in rows]
    # most recorded answers are right (the base model knows colours well, shapes less: see the benchmark)
    assert sum(r["recorded"] == r["answer"] for r in rows) > len(rows) // 2


def test_llava_single_and_batched_answers_agree(llava):
    rows = CASES["llava"][:3]
    batched = _answer(llava, [_image(r["image"]) for r in rows], [r["question"] for r in rows])
    single = [_answer(llava, [_image(r["image"])], [r["question"]])[0] for r in rows]
    assert batched == single


# ---------------------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_encoder():
    from esg_memory.encoders import ClipKeyEncoder

    return ClipKeyEncoder(P.easyvqa_clip_spec().model_name)


def test_clip_spec_builds_with_open_clip():
    import open_clip
    import torch
    from safetensors.torch import load_file

    spec = P.easyvqa_clip_spec()
    assert spec.weights.is_file() and spec.model_cfg["vision_cfg"]["image_size"] == 64
    assert spec.model_cfg["text_cfg"]["hf_tokenizer_name"] == str(spec.directory)
    model, _, preprocess = open_clip.create_model_and_transforms(spec.model_name)
    tokenizer = open_clip.get_tokenizer(spec.model_name)
    # the same architecture from the config dict alone takes the same weights
    again = open_clip.model.CLIP(**spec.model_cfg)
    again.load_state_dict(load_file(str(spec.weights)), strict=True)
    x = preprocess(_image(CASES["encoder"][0]["image"])).unsqueeze(0)
    tokens = tokenizer(["what color is the shape?"])
    assert tokens.shape == (1, spec.model_cfg["text_cfg"]["context_length"])
    with torch.inference_mode():
        a, b = model.eval().encode_image(x), again.float().eval().encode_image(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_encoder_places_same_subject_pictures_nearer(clip_encoder):
    rows = CASES["encoder"]
    keys = clip_encoder.encode_images([_image(r["image"]) for r in rows])
    assert keys.shape == (len(rows), clip_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    subj = [(r["shape"], r["colour"]) for r in rows]
    sim = keys @ keys.T
    same = np.array([[a == b for b in subj] for a in subj])
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    masked = np.where(np.eye(len(rows), dtype=bool), -np.inf, sim)
    nearest_same = [bool(same[i, int(np.argmax(masked[i]))]) for i in range(len(rows))]
    # nearly every picture's nearest other picture shows the same shape and colour (held-out top-1 is
    # ~0.86; the misses are same-colour pictures of another shape, e.g. a red circle and a red rectangle)
    assert sum(nearest_same) >= len(rows) - 2
    for i in range(len(rows)):
        # ... and for every picture, same-subject pictures are on average clearly nearer than the rest
        assert sim[i][same[i]].mean() > sim[i][other[i]].mean() + 0.2


def test_encoder_text_names_the_subject(clip_encoder):
    rows = CASES["encoder"]
    keys = clip_encoder.encode_images([_image(r["image"]) for r in rows])
    subjects = sorted({(r["shape"], r["colour"]) for r in rows})
    caps = clip_encoder.encode_texts([P.caption(s, c) for s, c in subjects])
    for j, (s, c) in enumerate(subjects):
        best = int(np.argmax(keys @ caps[j]))
        assert (rows[best]["shape"], rows[best]["colour"]) == (s, c)


def test_missing_assets_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "_ASSETS", tmp_path)
    with pytest.raises(ConfigError, match="missing"):
        P.pretrained_path(P.EASYVQA_LLAVA)
    (tmp_path / P.EASYVQA_CLIP).mkdir()
    (tmp_path / P.EASYVQA_CLIP / "esg_pretrained.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FormatError):
        P.pretrained_info(P.EASYVQA_CLIP)


def test_wrapper_loads_the_shipped_models_by_path(clip_encoder):
    """``EditedModel.from_pretrained(pretrained_path(...))`` with no edits answers exactly as recorded."""
    from esg_memory.model import EditedModel

    em = EditedModel.from_pretrained(P.pretrained_path(P.EASYVQA_LLAVA), encoder=clip_encoder)
    rows = CASES["llava"]
    got = em.answer(images=[_image(r["image"]) for r in rows], prompts=[r["question"] for r in rows])
    assert got == [r["recorded"] for r in rows]


# ---------------------------------------------------------------------------------- locality pool
POOL_DIR = Path(P.__file__).resolve().parent / "assets" / P.EASYVQA_POOL


def test_locality_pool_loads_two_train_pictures_per_subject():
    pool = P.easyvqa_locality_pool()
    doc = json.loads((POOL_DIR / "pool.json").read_text(encoding="utf-8"))
    assert len(pool) == len(doc["pictures"]) == 2 * len(P.EASYVQA_SHAPES) * len(P.EASYVQA_COLOURS)
    assert len({p for p, _ in pool}) == len(pool)
    per_subject: dict[tuple[str, str], int] = {}
    for (path, question), row in zip(pool, doc["pictures"], strict=True):
        assert path.parent == POOL_DIR and path.name == f"train_{row['train_id']}.png"  # train split only
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64)
        assert question in doc["questions"]
        per_subject[(row["shape"], row["colour"])] = per_subject.get((row["shape"], row["colour"]), 0) + 1
    assert set(per_subject.values()) == {2} and len(per_subject) == 24
    # the pool's generic questions are not the questions edits are made on
    assert not {q for _, q in pool} & {"what color is the shape?", "what shape is in the image?"}


def test_memory_config_crosses_every_pool_picture():
    cfg = P.easyvqa_memory_config()
    assert cfg.n_pool_images >= len(P.easyvqa_locality_pool())
    assert P.easyvqa_memory_config(margin=0.03).margin == 0.03
    with pytest.raises(ConfigError):
        P.easyvqa_memory_config(no_such_field=1)
    with pytest.raises(ConfigError):
        P.easyvqa_memory_config(n_pool_images=-1)


def test_missing_or_bad_pool_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "_ASSETS", tmp_path)
    with pytest.raises(ConfigError, match="missing"):
        P.easyvqa_locality_pool()
    d = tmp_path / P.EASYVQA_POOL
    d.mkdir()
    (d / "pool.json").write_text(json.dumps({"format_version": 99, "pictures": []}), encoding="utf-8")
    with pytest.raises(FormatError, match="format_version"):
        P.easyvqa_locality_pool()
    row = {"file": "../escape.png", "question": "q?"}
    (d / "pool.json").write_text(json.dumps({"format_version": 1, "pictures": [row]}), encoding="utf-8")
    with pytest.raises(FormatError):
        P.easyvqa_locality_pool()
    row = {"file": "gone.png", "question": "q?"}
    (d / "pool.json").write_text(json.dumps({"format_version": 1, "pictures": [row]}), encoding="utf-8")
    with pytest.raises(ConfigError, match="missing"):
        P.easyvqa_locality_pool()


def test_with_the_pool_an_edit_stays_off_other_subjects(clip_encoder):
    """Route level, no tuning: a red-circle edit covers its own input, a rephrasing and the other red
    circles, not the same question on blue rectangles, green triangles or teal circles; a blue-rectangle
    edit stays off red rectangles, which the library default (no pool) lets in: the pool's "same
    question, other image" negatives are what keep it off."""
    from esg_memory.memory import EditMemory

    def subject(shape, colour):
        return [FIX / r["image"] for r in CASES["encoder"] if (r["shape"], r["colour"]) == (shape, colour)]

    def memory():
        pool = P.easyvqa_locality_pool()
        return EditMemory(clip_encoder, config=P.easyvqa_memory_config(), locality_pool=pool)

    q = "what color is the shape?"
    red_circle, blue_rect = subject("circle", "red"), subject("rectangle", "blue")
    others = blue_rect + subject("triangle", "green") + subject("circle", "teal")
    mem = memory()
    eid = mem.add(image=red_circle[0], question=q, answer="green")
    own = mem.route(images=[red_circle[0]] * 2, texts=[q, "what is the color of the shape?"])
    assert list(own.edit_ids) == [eid, eid]
    assert list(mem.route(images=red_circle[1:], texts=[q] * 2).edit_ids) == [eid, eid]
    assert (mem.route(images=others, texts=[q] * len(others)).edit_ids == -1).all()

    red_rect = subject("rectangle", "red")
    mem, default = memory(), EditMemory(clip_encoder)
    eid, did = (m.add(image=blue_rect[0], question=q, answer="green") for m in (mem, default))
    assert list(mem.route(images=blue_rect[1:], texts=[q] * 2).edit_ids) == [eid, eid]
    assert (mem.route(images=red_rect, texts=[q] * 3).edit_ids == -1).all()
    assert (default.route(images=red_rect, texts=[q] * 3).edit_ids == did).any()


def test_a_saved_wrapper_reloads_from_its_directory_alone(tmp_path):
    import json

    from esg_memory.loading import load_base_model, load_encoder
    from esg_memory.memory import EditMemory
    from esg_memory.model import EditedModel

    model, proc = load_base_model("tiny-llava")
    em = EditedModel.wrap(model, proc, EditMemory(load_encoder("esg-easyvqa-clip")))  # saved by name
    img = _image("test_17.png")
    em.add_edit(img, "what color is the shape?", "purple", tune="sync")
    em.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "edited_model.json").read_text())
    assert meta["name_or_path"] == P.EASYVQA_LLAVA  # the registered name, not the install's path
    again = EditedModel.from_pretrained(tmp_path / "saved")  # base and encoder from the directory
    qs = ["what color is the shape?", "what shape is in the image?"]
    assert again.answer([img] * 2, qs) == em.answer([img] * 2, qs) and again.answer([img], qs[:1]) == [
        "purple"
    ]
