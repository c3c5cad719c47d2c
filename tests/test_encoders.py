"""Key encoders: shapes, unit norm, determinism, caching, fusion, weight loading, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _encoders_fixtures import png_bytes, shape_image

from esg_memory.encoders import (
    TINY_CLIP_NAME,
    ClipKeyEncoder,
    CompositeKeyEncoder,
    KeyEncoder,
    MiniLMTextEncoder,
    create_encoder,
    fuse_embeddings,
    list_encoders,
    register_encoder,
    register_tiny_clip,
)
from esg_memory.errors import ConfigError, FormatError, ImageError, InvalidInputError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    out = {}
    for color, shape in [("red", "circle"), ("blue", "rectangle"), ("green", "triangle")]:
        p = d / f"{color}_{shape}.png"
        shape_image(color, shape).save(p)
        out[f"{color}_{shape}"] = p
    return out


@pytest.fixture(scope="module")
def enc():
    return ClipKeyEncoder(TINY_CLIP_NAME)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def _rows(images):
    ims = [images["red_circle"], None, images["blue_rectangle"], images["red_circle"], None]
    txs = ["what color is the shape?", "is there a red shape?", None, "what shape is in the image?", "who?"]
    return ims, txs


def test_protocol_shape_dtype_unit_norm(enc, images):
    assert isinstance(enc, KeyEncoder)
    ims, txs = _rows(images)
    k = enc.encode(ims, txs)
    assert k.shape == (5, enc.dim) and k.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(k, axis=1), 1.0, atol=1e-5)
    assert enc.encode_images([images["red_circle"]]).shape == (1, enc.dim)
    assert enc.encode_texts(["a", "b"]).shape == (2, enc.dim)
    assert enc.encode([], []).shape == (0, enc.dim)
    # a whole argument may be None: "this modality is absent in every row"
    np.testing.assert_array_equal(enc.encode(None, ("a?", "b?")), enc.encode_texts(["a?", "b?"]))
    np.testing.assert_array_equal(
        enc.encode([images["red_circle"]], None), enc.encode_images([images["red_circle"]])
    )
    assert enc.name == "open_clip:esg-tiny-clip:random-seed0:fuse=sum:iw=0.5"


def test_single_modality_rows_match_dedicated_calls(enc, images):
    ims, txs = _rows(images)
    k = enc.encode(ims, txs)
    np.testing.assert_allclose(k[2], enc.encode_images([images["blue_rectangle"]])[0], atol=1e-6)
    np.testing.assert_allclose(k[1], enc.encode_texts(["is there a red shape?"])[0], atol=1e-6)
    # the sum rule, recomputed from the raw tower embeddings
    i = enc.embed_images([images["red_circle"]])[0]
    t = enc.embed_texts(["what color is the shape?"])[0]
    want = 0.5 * i + 0.5 * t
    np.testing.assert_allclose(k[0], want / np.linalg.norm(want), atol=1e-6)


def test_batch_equals_rows_one_by_one(images):
    fresh = ClipKeyEncoder(TINY_CLIP_NAME, cache_size=0)
    other = ClipKeyEncoder(TINY_CLIP_NAME, cache_size=0)
    ims, txs = _rows(images)
    batch = fresh.encode(ims, txs)
    single = np.concatenate([other.encode([a], [b]) for a, b in zip(ims, txs, strict=True)])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_same_pixels_as_path_bytes_or_pil_give_same_key(enc, images):
    p = images["green_triangle"]
    from PIL import Image

    keys = enc.encode([p, png_bytes(shape_image("green", "triangle")), Image.open(p)], ["q?", "q?", "q?"])
    np.testing.assert_allclose(keys[0], keys[1], atol=1e-6)
    np.testing.assert_allclose(keys[0], keys[2], atol=1e-6)


def test_cache_second_call_hits_and_never_reencodes(images):
    e = ClipKeyEncoder(TINY_CLIP_NAME)
    ims, txs = _rows(images)
    first = e.encode(ims, txs)
    info1 = e.cache_info()
    # 2 distinct images + 4 distinct texts; the repeated red circle is a hit within the call
    assert (info1.misses, info1.hits, info1.size) == (6, 1, 6)
    second = e.encode(ims, txs)
    info2 = e.cache_info()
    assert info2.misses == info1.misses and info2.hits == info1.hits + 7
    np.testing.assert_array_equal(first, second)
    e.clear_cache()
    assert e.cache_info().size == 0


def test_cache_is_lru_bounded_and_can_be_disabled(images):
    e = ClipKeyEncoder(TINY_CLIP_NAME, cache_size=2)
    e.encode_texts(["a?", "b?", "c?"])
    assert e.cache_info().size == 2
    e.encode_texts(["a?"])  # evicted first: a miss again
    assert e.cache_info().misses == 4
    off = ClipKeyEncoder(TINY_CLIP_NAME, cache_size=0)
    off.encode_texts(["a?", "a?"])
    off.encode_texts(["a?"])
    assert off.cache_info().size == 0 and off.cache_info().misses == 2


def test_failed_call_leaves_cache_unchanged(images):
    e = ClipKeyEncoder(TINY_CLIP_NAME)
    e.encode_texts(["kept?"])
    before = e.cache_info().size
    with pytest.raises(ImageError):
        e.encode([images["red_circle"], b"not an image"], ["new text?", "other new text?"])
    assert e.cache_info().size == before


_CHILD = """
import os, sys, hashlib
sys.path.insert(0, {repo!r})
before = dict(os.environ)
import open_clip
import esg_memory.encoders
assert dict(os.environ) == before, "importing esg_memory.encoders changed the environment"
assert "esg-tiny-clip" not in open_clip.list_models(), "registered at import time"
e = esg_memory.encoders.ClipKeyEncoder("esg-tiny-clip")
assert dict(os.environ) == before, "building an encoder changed the environment"
k = e.encode([{img!r}, None], ["what color is the shape?", "is there a red shape?"])
print(e.name, hashlib.sha256(k.round(5).tobytes()).hexdigest())
"""


@pytest.mark.slow  # end to end, several seconds; still run in CI
def test_keys_identical_across_processes_and_import_has_no_side_effects(enc, images):
    img = str(images["red_circle"])
    code = _CHILD.format(repo=str(REPO), img=img)
    # the child runs without the offline variables conftest sets: nothing may depend on them
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # this process and a fresh one must agree (rounded: BLAS may differ in the last ulp)
    k = enc.encode([img, None], ["what color is the shape?", "is there a red shape?"])
    want = f"{enc.name} {hashlib.sha256(k.round(5).tobytes()).hexdigest()}"
    assert out.stdout.strip().splitlines()[-1] == want


def test_register_tiny_clip_is_idempotent():
    import open_clip

    register_tiny_clip()
    n = len(open_clip.list_models())
    register_tiny_clip()
    assert len(open_clip.list_models()) == n and TINY_CLIP_NAME in open_clip.list_models()


def test_seed_changes_weights_and_name_and_leaves_global_rng_alone(enc):
    state = torch.random.get_rng_state()
    other = ClipKeyEncoder(TINY_CLIP_NAME, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert other.name == "open_clip:esg-tiny-clip:random-seed1:fuse=sum:iw=0.5"
    assert not np.allclose(other.encode_texts(["x?"]), enc.encode_texts(["x?"]))


@pytest.mark.parametrize(("fuse", "factor"), [("sum", 1), ("concat", 2), ("product", 1)])
def test_fusion_rules(enc, images, fuse, factor):
    e = enc.with_fusion(fuse, 0.7)
    assert e.dim == factor * enc.embed_dim and f"fuse={fuse}" in e.name
    ims, txs = _rows(images)
    k = e.encode(ims, txs)
    np.testing.assert_allclose(np.linalg.norm(k, axis=1), 1.0, atol=1e-5)
    i = enc.embed_images([images["red_circle"]])[0]
    t = enc.embed_texts(["what color is the shape?"])[0]
    if fuse == "concat":
        np.testing.assert_allclose(k[0], np.concatenate([np.sqrt(0.7) * i, np.sqrt(0.3) * t]), atol=1e-6)
        # text-only row: zero image half, so its cosine to a fused key is capped by sqrt(1 - w)
        assert np.all(k[1][: enc.embed_dim] == 0)
    elif fuse == "product":
        np.testing.assert_allclose(k[0], i * t / np.linalg.norm(i * t), atol=1e-6)
    else:
        want = 0.7 * i + 0.3 * t
        np.testing.assert_allclose(k[0], want / np.linalg.norm(want), atol=1e-6)


def test_fuse_embeddings_degenerate_sum_falls_back_to_image():
    v = np.array([[1.0, 0.0]], dtype=np.float32)
    k = fuse_embeddings(v, -v, np.array([True]), np.array([True]), "sum", 0.5)
    np.testing.assert_allclose(k, v)
    with pytest.raises(ConfigError):
        fuse_embeddings(v, np.ones((1, 3)), np.array([True]), np.array([True]), "sum", 0.5)


def test_weights_from_safetensors_file_and_local_dir(enc, images, tmp_path):
    d = enc.save_pretrained(tmp_path / "tiny")
    weights = d / "open_clip_model.safetensors"
    assert json.loads((d / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 64
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    ims, txs = _rows(images)
    want = enc.encode(ims, txs)
    # seed=7 would give other random weights: equal keys prove the file was loaded
    from_file = ClipKeyEncoder(TINY_CLIP_NAME, pretrained=weights, seed=7)
    np.testing.assert_allclose(from_file.encode(ims, txs), want, atol=1e-6)
    assert from_file.name == f"open_clip:esg-tiny-clip:sha256-{sha}:fuse=sum:iw=0.5"
    from_dir = ClipKeyEncoder(f"local-dir:{d}", seed=7)
    np.testing.assert_allclose(from_dir.encode(ims, txs), want, atol=1e-6)
    assert from_dir.name == from_file.name  # the directory's config is recognised as esg-tiny-clip
    spec = create_encoder(f"{TINY_CLIP_NAME}:{weights}")
    assert spec.name == from_file.name


def test_weights_from_pt_file_use_weights_only(enc, images, tmp_path):
    p = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc.model.state_dict().items()}}, p)
    e = ClipKeyEncoder(TINY_CLIP_NAME, pretrained=str(p), seed=3)
    np.testing.assert_allclose(e.encode_texts(["hi?"]), enc.encode_texts(["hi?"]), atol=1e-6)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}, protocol=2))
    with pytest.raises(FormatError):
        ClipKeyEncoder(TINY_CLIP_NAME, pretrained=bad)
    assert not marker.exists()


def test_bad_weight_files(enc, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(FormatError):
        ClipKeyEncoder(TINY_CLIP_NAME, pretrained=junk)
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    sd = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    sd.pop("text_projection")
    save_file(sd, str(partial))
    with pytest.raises(FormatError, match="does not fit"):
        ClipKeyEncoder(TINY_CLIP_NAME, pretrained=partial)
    with pytest.raises(ConfigError, match="not found"):
        ClipKeyEncoder(TINY_CLIP_NAME, pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError):
        ClipKeyEncoder(TINY_CLIP_NAME, pretrained=tmp_path / "weights.npz")


def test_bad_local_dirs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ClipKeyEncoder(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"open_clip_config\.json"):
        ClipKeyEncoder(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(FormatError):
        ClipKeyEncoder(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 8}}')
    with pytest.raises(FormatError):
        ClipKeyEncoder(f"local-dir:{tmp_path}")
    with pytest.raises(ConfigError):
        ClipKeyEncoder(f"local-dir:{tmp_path}", pretrained="x.safetensors")


def test_hub_tags_fail_fast_offline_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not in the local cache"):
        ClipKeyEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="tags"):
        ClipKeyEncoder("ViT-B-32", pretrained="no-such-tag", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="Hugging Face cache"):
        ClipKeyEncoder("hf-hub:nobody/nothing", cache_dir=str(tmp_path))


def test_unknown_model_lists_models():
    with pytest.raises(ConfigError) as ei:
        ClipKeyEncoder("ViT-Nope")
    assert "esg-tiny-clip" in str(ei.value) and "ViT-B-32" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        create_encoder("nope")
    assert "minilm" in str(ei.value) and "ViT-B-32" in str(ei.value)


@pytest.mark.parametrize(
    ("images_arg", "texts_arg", "err"),
    [
        ([None], [None], InvalidInputError),
        ([None, None], ["a?"], InvalidInputError),
        ([b"not a png"], ["a?"], ImageError),
        ([Path("/no/such/image.png")], [None], ImageError),
        (None, "a question as a bare string", InvalidInputError),
        ([None], [""], InvalidInputError),
        ([None], [3], InvalidInputError),
        (None, None, None),
    ],
)
def test_bad_inputs(enc, images_arg, texts_arg, err):
    if err is None:
        assert enc.encode(images_arg, texts_arg).shape == (0, enc.dim)
        return
    with pytest.raises(err):
        enc.encode(images_arg, texts_arg)


def test_bad_configuration():
    for kw in (
        {"fuse": "max"},
        {"image_weight": 1.5},
        {"image_weight": "a"},
        {"cache_size": -1},
        {"batch_size": 0},
        {"seed": "x"},
        {"device": "nonsense"},
    ):
        with pytest.raises(ConfigError):
            ClipKeyEncoder(TINY_CLIP_NAME, **kw)
    with pytest.raises(InvalidInputError):
        ClipKeyEncoder(TINY_CLIP_NAME).encode_images([None])


def test_minilm_semantics(minilm):
    assert isinstance(minilm, KeyEncoder) and minilm.dim == 384
    assert minilm.name.startswith("minilm:all-MiniLM-L6-v2:sha256-")
    k = minilm.encode_texts(
        ["What color is the shape?", "What is the color of the shape?", "Who wrote the novel Hamlet?"]
    )
    np.testing.assert_allclose(np.linalg.norm(k, axis=1), 1.0, atol=1e-5)
    assert k[0] @ k[1] > 0.9 > k[0] @ k[2]
    one = np.concatenate([minilm.encode_texts([t]) for t in ["short?", "a much longer question here?"]])
    np.testing.assert_allclose(
        minilm.encode_texts(["short?", "a much longer question here?"]), one, atol=1e-5
    )
    with pytest.raises(InvalidInputError, match="text only"):
        minilm.encode([b"\x89PNG"], ["q?"])
    with pytest.raises(ConfigError):
        MiniLMTextEncoder(model_dir="/no/such/dir")


def test_composite(minilm, enc, images):
    c = CompositeKeyEncoder(minilm, enc)
    assert isinstance(c, KeyEncoder) and c.dim == 384 + 64 and "fuse=concat" in c.name
    ims, txs = _rows(images)
    k = c.encode(ims, txs)
    np.testing.assert_allclose(np.linalg.norm(k, axis=1), 1.0, atol=1e-5)
    # text-only rows: zeros in the image part, the MiniLM embedding in the text part
    assert np.all(k[1][:64] == 0)
    np.testing.assert_allclose(k[1][64:], minilm.encode_texts([txs[1]])[0], atol=1e-6)
    s = CompositeKeyEncoder(minilm, enc, fuse="sum", seed=3)
    assert s.dim == 384 and "proj=orth-seed3" in s.name
    ks = s.encode(ims, txs)
    np.testing.assert_allclose(np.linalg.norm(ks, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ks, CompositeKeyEncoder(minilm, enc, fuse="sum", seed=3).encode(ims, txs))
    # same-dim towers need no projection
    same = CompositeKeyEncoder(enc, ClipKeyEncoder(TINY_CLIP_NAME, seed=1), fuse="sum")
    assert same.dim == 64 and "proj" not in same.name
    assert c.cache_info().hits > 0
    spec = create_encoder("minilm+esg-tiny-clip")
    assert isinstance(spec, CompositeKeyEncoder) and spec.dim == 448
    with pytest.raises(ConfigError):
        CompositeKeyEncoder(minilm, object())


def test_registry():
    assert {"esg-tiny-clip", "minilm"} <= set(list_encoders())
    register_encoder("tiny-concat-test", lambda **kw: ClipKeyEncoder(TINY_CLIP_NAME, fuse="concat", **kw))
    e = create_encoder("tiny-concat-test", seed=2)
    assert e.dim == 128 and "random-seed2" in e.name and "tiny-concat-test" in list_encoders()
    with pytest.raises(ConfigError, match="already registered"):
        register_encoder("tiny-concat-test", lambda **kw: None)
    for bad in ("", "a+b", "a:b", 3):
        with pytest.raises(ConfigError):
            register_encoder(bad, lambda **kw: None)
    with pytest.raises(ConfigError):
        register_encoder("ok-name", "not callable")


def _fake_hf_cache(root: Path, repo: str, filename: str, data: bytes) -> Path:
    """The layout huggingface_hub's cache uses: refs/main -> snapshots/<commit>/<file>."""
    base = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(data)
    return snap / filename


def test_pretrained_tags_resolve_from_local_caches_only(tmp_path):
    from esg_memory.encoders.clip import _resolve_tag

    # an hf-hub tag: found in the HF cache, safetensors twin preferred
    f = _fake_hf_cache(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors", b"x")
    path, cfg = _resolve_tag("ViT-B-32", "laion2b_s34b_b79k", False, str(tmp_path))
    assert path == f and cfg["hf_hub"].startswith("laion/")
    # an OpenAI tag whose file sits in the url cache; its config asks for QuickGELU
    (tmp_path / "ViT-B-32.pt").write_bytes(b"y")
    path, cfg = _resolve_tag("ViT-B-32", "openai", False, str(tmp_path))
    assert path == tmp_path / "ViT-B-32.pt" and cfg["quick_gelu"] is True
    with pytest.raises(ConfigError, match="allow_download=True"):
        _resolve_tag("ViT-B-16", "laion2b_s34b_b88k", False, str(tmp_path))


def test_fusion_benchmark_smoke(tmp_path):
    import importlib.util

    import easy_vqa  # noqa: F401  (an [all] extra: missing means failing, never skipping)

    spec = importlib.util.spec_from_file_location("bench_fusion", REPO / "benchmarks" / "bench_fusion.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    out = tmp_path / "r.json"
    assert bench.main(["--edits", "12", "--encoders", "esg-tiny-clip", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["edits"] == 12 and len(result["rows"]) == 9
    assert all(0.0 <= r["auc_all"] <= 1.0 for r in result["rows"])


def test_pretrained_tag_end_to_end_applies_the_tags_settings(enc, images, tmp_path, monkeypatch):
    import open_clip.pretrained as ocp

    # a tag for the tiny model whose (cached) weights were trained with QuickGELU, like OpenAI's
    monkeypatch.setitem(
        ocp._PRETRAINED, TINY_CLIP_NAME, {"esgtag": {"hf_hub": "esg/tiny-tag/", "quick_gelu": True}}
    )
    d = enc.save_pretrained(tmp_path / "src")
    weights = (d / "open_clip_model.safetensors").read_bytes()
    _fake_hf_cache(tmp_path / "hf", "esg/tiny-tag", "open_clip_model.safetensors", weights)
    tagged = ClipKeyEncoder(TINY_CLIP_NAME, pretrained="esgtag", cache_dir=str(tmp_path / "hf"))
    plain = ClipKeyEncoder(TINY_CLIP_NAME, pretrained=d / "open_clip_model.safetensors")
    # same weights file, other activation: another identity
    assert tagged.name != plain.name and tagged.weights_id == plain.weights_id
    ims, txs = _rows(images)
    # same weights, other activation: the tag's QuickGELU was applied
    assert not np.allclose(tagged.encode(ims, txs), plain.encode(ims, txs), atol=1e-4)
    # and a saved copy keeps it
    again = ClipKeyEncoder(f"local-dir:{tagged.save_pretrained(tmp_path / 'copy')}")
    np.testing.assert_allclose(again.encode(ims, txs), tagged.encode(ims, txs), atol=1e-6)
    assert again.name == tagged.name


def test_concurrent_calls_agree_and_count_every_lookup(images):
    from concurrent.futures import ThreadPoolExecutor

    e = ClipKeyEncoder(TINY_CLIP_NAME)
    ims, txs = _rows(images)
    want = ClipKeyEncoder(TINY_CLIP_NAME, cache_size=0).encode(ims, txs)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: e.encode(ims, txs), range(8)))
    for r in results:
        np.testing.assert_allclose(r, want, atol=1e-5)
    info = e.cache_info()
    assert info.hits + info.misses == 8 * 7 and info.size == 6  # 7 lookups per call, 6 distinct items


def test_a_memory_made_with_a_shipped_encoder_reloads_without_naming_it(tmp_path):
    from esg_memory import EditMemory
    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.errors import ConfigError

    shipped = ClipKeyEncoder("esg-tiny-clip")
    assert shipped.spec == "esg-tiny-clip"
    mem = EditMemory(shipped)
    mem.add(question="what is it?", answer="a lynx")
    mem.save(tmp_path / "m")
    again = EditMemory.load(tmp_path / "m")
    assert again.encoder.name == shipped.name and len(again) == 1
    # non-default options are not captured by a name: the user must pass the encoder
    custom = ClipKeyEncoder("esg-tiny-clip", image_weight=0.7)
    assert custom.spec is None
    mem = EditMemory(custom)
    mem.save(tmp_path / "c")
    with pytest.raises(ConfigError, match="pass encoder="):
        EditMemory.load(tmp_path / "c")
