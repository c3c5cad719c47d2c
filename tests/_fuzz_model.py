"""Hostile calls into the library's key encoders and `EditedModel` (tiny models) for the fuzz suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from _fuzz_fixtures import BadCase, _arr, hostile_images, save_targets
from _memory_fixtures import png_bytes, shape_image

__all__ = ["encoder_cases", "encoder_state", "model_cases"]

Q = "what color is the shape?"


def model_cases(em: Any, img: Any, tmp: Path) -> list[BadCase]:
    """generate / retrieve / add_edit / revise_edit / delete_edit with bad prompts, images, keys, ids."""
    dim = int(em.memory.encoder.dim)
    cases: list[BadCase] = []

    def add(cat: str, name: str, fn) -> None:
        cases.append(BadCase(cat, f"EditedModel.{name}", fn))

    def gen(**kw: Any) -> Any:
        return em.generate(max_new_tokens=2, **kw)

    bad_prompts: dict[str, Any] = {
        "empty": [""],
        "whitespace": ["  "],
        "None row": [None],
        "int row": [5],
        "int": 5,
        "dict": {"q": 1},
        "NUL": ["what\x00?"],
        "lone surrogate": ["what \udfff?"],
        "over the text limit": ["q" * 9000],
        "bytes": [b"what?"],
    }
    for name, p in bad_prompts.items():
        add("model", f"generate(prompts={name})", lambda p=p: gen(images=[img], prompts=p))
        if name != "None row":  # an image-only row is a valid retrieve
            add("model", f"retrieve(prompts={name})", lambda p=p: em.retrieve(images=[img], prompts=p))
        if isinstance(p, list) and (p[0] is None or isinstance(p[0], str)):
            add("model", f"add_edit(question={name})", lambda p=p: em.add_edit(img, p[0], "x"))
            add("model", f"add_edit(answer={name})", lambda p=p: em.add_edit(img, "a new question?", p[0]))
    for name, im in hostile_images(tmp / "model-images").items():
        if name in ("bytes over the size limit", "random bytes"):
            continue  # same path as the other undecodable bytes; keeps the suite fast
        add("model", f"generate(images=[{name}])", lambda im=im: gen(images=[im], prompts=[Q]))
        add("model", f"add_edit(image={name})", lambda im=im: em.add_edit(im, "some question?", "x"))
    for name, k in {
        "NaN": np.full((1, dim), np.nan),
        "zero": np.zeros((1, dim)),
        "wrong dim": np.ones((1, dim + 3)),
        "two rows for one": np.ones((2, dim)),
        "strings": [["a"] * dim],
    }.items():
        add("model", f"generate(route_keys={name})", lambda k=k: gen(images=[img], prompts=[Q], route_keys=k))
        if name != "two rows for one":
            add("model", f"retrieve(keys={name})", lambda k=k: em.retrieve(keys=k))
    structural = {
        "generate(images without prompts)": lambda: gen(images=[img]),
        "generate(rows differ)": lambda: gen(images=[img, img], prompts=[Q]),
        "generate(route_texts rows differ)": lambda: gen(images=[img], prompts=[Q], route_texts=[Q, Q]),
        "generate(prompts and input_ids)": lambda: gen(prompts=[Q], input_ids=np.ones((1, 3))),
        "retrieve()": lambda: em.retrieve(),
        "answer(no prompts)": lambda: em.answer([img], None),
        "add_edit(tune='bogus')": lambda: em.add_edit(img, "q?", "a", tune="bogus"),
        "add_edit(positives=5)": lambda: em.add_edit(img, "q?", "a", positives=5),
        "add_edit(metadata=list)": lambda: em.add_edit(img, "q?", "a", metadata=[1, 2]),
        "add_edit(edit_id=existing)": lambda: em.add_edit(img, "q?", "a", edit_id=0),
        "add_edit(edit_id=-1)": lambda: em.add_edit(img, "q?", "a", edit_id=-1),
        "add_edit(edit_id=1.0)": lambda: em.add_edit(img, "q?", "a", edit_id=1.0),
        "revise_edit(unknown)": lambda: em.revise_edit(10**6, answer="x"),
        "revise_edit(nothing)": lambda: em.revise_edit(0),
        "revise_edit(answer='')": lambda: em.revise_edit(0, answer=""),
        "revise_edit(tune='bogus')": lambda: em.revise_edit(0, tune="bogus", answer="x"),
        "delete_edit(None)": lambda: em.delete_edit(None),
        "delete_edit(unknown)": lambda: em.delete_edit(10**6),
        "delete_edit(True)": lambda: em.delete_edit(True),
        "tune_edit(unknown)": lambda: em.tune_edit(10**6),
        "adapter(version=99)": lambda: em.adapter(0, version=99),
    }
    for name, fn in structural.items():
        add("model", name, fn)
    for name, target in save_targets(tmp / "model-targets").items():
        if "directory" not in name:  # a wrapper directory (even through a symlink) may hold other files
            add("model", f"save({name})", lambda target=target: em.save(target))
    return cases


def encoder_state(enc: Any) -> str:
    """What the encoder returns for a fixed batch (a poisoned cache would change it)."""
    img = png_bytes(shape_image("blue"))
    return _arr(enc.encode([img, None, img], ["what is it?", "who wrote hamlet?", None]))


def encoder_cases(enc: Any, tmp: Path) -> list[BadCase]:
    """``encode`` / ``encode_images`` / ``encode_texts`` of a `KeyEncoder` with bad rows."""
    good = png_bytes(shape_image("red"))
    cases: list[BadCase] = []

    def add(name: str, fn) -> None:
        cases.append(BadCase("encoders", f"{type(enc).__name__}.{name}", fn))

    for name, t in {
        "empty": "",
        "whitespace": "  ",
        "lone surrogate": "a\ud800",
        "int": 5,
        "bytes": b"x",
        "list": ["x"],
    }.items():
        add(f"encode(texts=[{name}])", lambda t=t: enc.encode([None], [t]))
        add(f"encode_texts([{name}])", lambda t=t: enc.encode_texts([t]))
    for name, im in hostile_images(tmp / "encoder-images").items():
        if name in ("bytes over the size limit", "random bytes"):
            continue
        add(f"encode(images=[{name}])", lambda im=im: enc.encode([im], ["what is it?"]))
        add(f"encode_images([{name}])", lambda im=im: enc.encode_images([im]))
    structural = {
        "encode(rows differ)": lambda: enc.encode([good, good], ["a?"]),
        "encode(row with nothing)": lambda: enc.encode([None], [None]),
        "encode(texts=str)": lambda: enc.encode(None, "what is it?"),
        "encode(images=bytes)": lambda: enc.encode(good, None),
        "encode(images=5)": lambda: enc.encode(5, ["a?"]),
        "encode_texts(str)": lambda: enc.encode_texts("what is it?"),
        "encode_images([None])": lambda: enc.encode_images([None]),
        "encode_images(PIL image)": lambda: enc.encode_images(shape_image("red")),
    }
    for name, fn in structural.items():
        add(name, fn)
    return cases


class _Evil:
    """A pickle whose loading would create a marker directory (it must never be unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def encoder_dir_cases(work: Path) -> tuple[list[BadCase], Path]:
    """`ClipKeyEncoder("local-dir:...")` on damaged copies of the shipped CLIP directory.

    Returns the cases and the marker path a malicious pickle would create if it were ever executed.
    """
    import json
    import pickle
    import shutil

    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.pretrained import pretrained_path

    src = pretrained_path("esg-easyvqa-clip")
    marker = work / "PWNED"
    cfg, weights = "open_clip_config.json", "open_clip_model.safetensors"

    def edit_cfg(fn):
        def damage(d: Path) -> None:
            doc = json.loads((d / cfg).read_text())
            fn(doc["model_cfg"])
            (d / cfg).write_text(json.dumps(doc))

        return damage

    def evil_weights(d: Path) -> None:
        (d / weights).unlink()
        (d / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker), protocol=2))

    variants = {
        "config not JSON": lambda d: (d / cfg).write_text("{nope"),
        "config nested 100k deep": lambda d: (d / cfg).write_text("[" * 100_000 + "]" * 100_000),
        "config is a list": lambda d: (d / cfg).write_text("[1]"),
        "config missing": lambda d: (d / cfg).unlink(),
        "width 10^6 (allocation bomb)": edit_cfg(lambda m: m["vision_cfg"].update(width=10**6)),
        "2000 layers": edit_cfg(lambda m: m["text_cfg"].update(layers=2000)),
        "negative embed_dim": edit_cfg(lambda m: m.update(embed_dim=-4)),
        "embed_dim a string": edit_cfg(lambda m: m.update(embed_dim="512")),
        "architecture changed (weights no longer fit)": edit_cfg(lambda m: m["text_cfg"].update(layers=1)),
        "weights truncated": lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:1000]),
        "weights random bytes": lambda d: (d / weights).write_bytes(bytes(range(256)) * 64),
        "weights a malicious pickle": evil_weights,
    }
    cases = []
    for i, (name, damage) in enumerate(variants.items()):
        d = work / f"clip-{i:02d}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(src, d)
        damage(d)
        cases.append(
            BadCase(
                "encoder files",
                f"ClipKeyEncoder(local-dir): {name}",
                lambda d=d: ClipKeyEncoder(f"local-dir:{d}"),
            )
        )
    return cases, marker
