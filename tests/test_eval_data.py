"""Evaluation-harness loaders on small fixtures derived from ../shared/data (see fixtures/eval/README.md)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from esg_memory.errors import ImageError
from esg_memory.eval import DatasetError, load_dataset, load_mmedit, load_text_records, load_vlkeb, subject_of

FIX = Path(__file__).parent / "fixtures" / "eval"


def test_mmedit_vqa_text_side_mode():
    ds = load_mmedit(FIX / "mmedit_vqa.json", "vqa")
    assert ds.image_mode == "text-side" and len(ds.cases) == 4
    c = ds.cases[0]
    raw = json.loads((FIX / "mmedit_vqa.json").read_text())[0]
    assert (c.question, c.target, c.rephrase, c.pred) == (
        raw["src"],
        raw["alt"],
        raw["rephrase"],
        raw["pred"],
    )
    assert c.loc.question == "who got the first nobel prize in physics"  # "nq question: " dropped
    assert c.loc.image is None and c.loc.target == raw["loc_ans"]
    assert (c.m_loc.question, c.m_loc.target) == (raw["m_loc_q"], raw["m_loc_a"])
    # image_rephrase is generated from the same COCO photo: same subject, same placeholder picture
    assert subject_of(raw["image"]) == subject_of(raw["image_rephrase"]) == "coco:58350"
    assert isinstance(c.image, bytes) and c.image_rephrase == (c.image,)
    assert c.m_loc.image != c.image  # another subject: another placeholder, never a blank one
    Image.open(io.BytesIO(c.image)).verify()
    assert [p.kind for p in c.generalization_probes()] == ["reliability", "t_gen", "i_gen"]
    assert c.portability == () and c.revisions and c.target not in c.revisions
    # OKEDIT-style hard negatives: this picture + unrelated question, this question + unrelated picture
    same_image, same_question = c.hard
    assert (same_image.kind, same_image.image, same_image.question) == (
        "hard_same_image",
        c.image,
        raw["m_loc_q"],
    )
    assert (same_question.kind, same_question.image, same_question.question) == (
        "hard_same_question",
        c.m_loc.image,
        c.question,
    )


def test_caption_and_vlkeb_portability():
    cap = load_mmedit(FIX / "mmedit_caption.json", "caption")
    assert {c.question for c in cap.cases} == {"a photo of"} and cap.cases[0].source == "E-IC"
    vl = load_vlkeb(FIX / "vlkeb_onehop.json")
    c = vl.cases[0]
    assert c.subject == "m.010rvx" and len(c.portability) == 1
    p = c.portability[0]
    assert p.kind == "portability" and p.image == c.image and p.target == "United States"
    assert all(case.portability == () for case in load_vlkeb(FIX / "vlkeb_eval.json").cases)
    # VLKEB's m_loc_q is a generic question of the same kind: only "same question, other picture" is hard
    assert [p.kind for p in c.hard] == ["hard_same_question"]


def test_text_records():
    zs = load_text_records(FIX / "zsre.json", "zsre")
    assert zs.image_mode == "none" and len(zs.cases) == 3
    c = zs.cases[0]
    assert c.image is None and c.target == "English" and c.loc.target == "Kevin Peter Hall"
    assert [p.kind for p in c.generalization_probes()] == ["reliability", "t_gen"]
    assert c.m_loc is None and c.image_rephrase == ()
    assert len(load_text_records(FIX / "counterfact.json", "counterfact").cases) == 2


def test_image_root_resolves_files_and_names_a_missing_one(tmp_path):
    recs = json.loads((FIX / "mmedit_vqa.json").read_text())[:1]
    data = tmp_path / "one.json"
    data.write_text(json.dumps(recs))
    root = tmp_path / "images"
    for rel in (recs[0]["image"], recs[0]["image_rephrase"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / rel, format="PNG")
    with pytest.raises(ImageError, match=r"COCO_val2014_000000339761\.jpg.*not found"):
        load_mmedit(data, "vqa", image_root=root)  # m_loc's picture is missing
    (root / recs[0]["m_loc"]).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / recs[0]["m_loc"], format="PNG")
    ds = load_mmedit(data, "vqa", image_root=root)
    assert ds.image_mode == "files" and ds.cases[0].image == str(root / recs[0]["image"])
    with pytest.raises(ImageError, match="not a directory"):
        load_mmedit(data, "vqa", image_root=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("alt"), r"record 1: missing field 'alt'"),
        (lambda r: r.update(src=""), r"record 1: field 'src' must be a non-empty str"),
        (lambda r: r.update(m_loc_a=3), r"record 1: field 'm_loc_a'"),
        (lambda r: r.update(port_new={"port_q": "x"}), r"record 1: field 'port_new' must be a list"),
        (lambda r: r.update(port_new=[{"port_q": "x"}]), r"record 1 port_new\[0\]: missing field 'port_a'"),
    ],
)
def test_bad_records_name_the_record_and_field(tmp_path, mutate, match):
    recs = json.loads((FIX / "vlkeb_onehop.json").read_text())
    mutate(recs[1])
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(recs))
    with pytest.raises(DatasetError, match=match):
        load_vlkeb(f)


def test_unreadable_files_and_text_fields(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_mmedit(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not readable JSON"):
        load_mmedit(tmp_path / "x.json")
    (tmp_path / "d.json").write_text(json.dumps({"src": "a"}))
    with pytest.raises(DatasetError, match="non-empty JSON list"):
        load_mmedit(tmp_path / "d.json")
    (tmp_path / "z.json").write_text(json.dumps([{"prompt": "p", "subject": "s", "target_new": "t"}]))
    with pytest.raises(DatasetError, match="record 0: missing field 'rephrase_prompt'"):
        load_text_records(tmp_path / "z.json", "zsre")
    (tmp_path / "s.json").write_text(
        json.dumps([{**json.loads((FIX / "mmedit_vqa.json").read_text())[0], "image": "pictures/cat.jpg"}])
    )
    with pytest.raises(Exception, match="cannot find a subject id"):
        subject_of("pictures/cat.jpg")
    # a picture without benchmark naming is a subject of its own: by its path in text-side mode
    assert load_mmedit(tmp_path / "s.json").cases[0].subject == "file:pictures/cat.jpg"


def test_load_dataset_with_pool_and_limit():
    ds = load_dataset("vqa", FIX / "mmedit_vqa.json", limit=2, pool_dir=FIX / "pool")
    assert len(ds.cases) == 2 and len(ds.pool) == 12  # 6 NQ questions + 6 OK-VQA (text-side pictures)
    assert sum(im is None for im, _ in ds.pool) == 6
    zs = load_dataset("zsre", FIX / "zsre.json", pool_dir=FIX / "pool")
    assert len(zs.pool) == 6 and all(im is None for im, _ in zs.pool)
    with pytest.raises(DatasetError, match="needs --data"):
        load_dataset("vqa")
    with pytest.raises(Exception, match="unknown data kind"):
        load_dataset("mmedit")


def test_easyvqa_set_structure():
    import easy_vqa  # noqa: F401  (an [all] extra: missing means failing, never skipping)

    from esg_memory.pretrained import derive_subjects  # noqa: F401  (the set's subjects come from it)

    ds = load_dataset("easyvqa", limit=30, seed=1)
    assert ds.image_mode == "files" and len(ds.cases) == 30 and len(ds.pool) == 48
    pairs = {(c.subject, c.question) for c in ds.cases}
    assert len(pairs) == 30  # no (subject, question family) edited twice
    for c in ds.cases:
        assert len(c.image_rephrase) == 2 and c.image not in c.image_rephrase
        assert c.target != c.pred and c.rephrase != c.question
        kinds = {p.kind: p for p in c.hard}
        if "hard_same_image" in kinds:
            assert kinds["hard_same_image"].image == c.image
            assert kinds["hard_same_image"].question != c.question
        if "hard_same_question" in kinds:
            assert kinds["hard_same_question"].question == c.question
            assert kinds["hard_same_question"].image != c.image
        assert c.loc.image is None
    assert [c.uid for c in load_dataset("easyvqa", limit=30, seed=1).cases] == [c.uid for c in ds.cases]
    assert [c.question for c in load_dataset("easyvqa", limit=30, seed=2).cases] != [
        c.question for c in ds.cases
    ]
    with pytest.raises(Exception, match=r"1\.\.312"):
        load_dataset("easyvqa", limit=313)


def test_scenes_set_structure():
    from esg_memory.eval.scenes import SCENES_MAX_EDITS
    from esg_memory.worlds import ScenesWorld

    world = ScenesWorld()
    assert (
        sum(len(world.families(s)) for s in world.subjects if world.subject_split(s) == "train")
        == SCENES_MAX_EDITS
    )
    ds = load_dataset("scenes", limit=12, seed=3)
    assert ds.kind == "scenes" and ds.image_mode == "files" and len(ds.cases) == 12
    assert len(ds.pool) == 256 and all(isinstance(im, bytes) and q for im, q in ds.pool)
    pool_images = {im for im, _ in ds.pool}
    for c in ds.cases:
        assert isinstance(c.image, bytes) and c.image.startswith(b"\x89PNG")
        assert c.target != c.pred and c.rephrase != c.question and c.target not in c.revisions[:-1]
        assert c.revisions[-1] == c.pred  # the last revision: "it was right"
        (im_g,) = c.image_rephrase
        ((im_it, q_it),) = c.image_text_rephrase
        assert im_g != c.image and im_it != c.image and q_it != c.question
        kinds = [p.kind for p in c.generalization_probes()]
        assert kinds == ["reliability", "t_gen", "i_gen", "i_t_gen"]
        loc = {p.kind: p for p in c.locality_probes()}
        assert loc["t_loc"].image is None and loc["m_loc"].image not in pool_images
        if "hard_same_image" in loc:
            assert loc["hard_same_image"].image == c.image and loc["hard_same_image"].question != c.question
        if "hard_same_question" in loc:
            assert loc["hard_same_question"].question == c.question
        # fixed targets are the world's own answers (what the bare model should say)
        assert all(p.target for p in c.locality_probes())
    again = load_dataset("scenes", limit=12, seed=3)
    assert [(c.image, c.question, c.target) for c in again.cases] == [
        (c.image, c.question, c.target) for c in ds.cases
    ]
    with pytest.raises(Exception, match=rf"1\.\.{SCENES_MAX_EDITS}"):
        load_dataset("scenes", limit=SCENES_MAX_EDITS + 1)


def _own_images_record(tmp_path: Path, **extra) -> tuple[Path, Path]:
    """One MMEdit-format record naming the user's own pictures (no COCO ids), the PNGs in tmp_path."""
    root = tmp_path / "my pictures"
    root.mkdir(exist_ok=True)
    colours = {"holiday.png": (200, 9, 9), "holiday again.png": (190, 20, 9), "street/dog.png": (9, 9, 200)}
    for name, colour in colours.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(root / name, format="PNG")
    rec = {**json.loads((FIX / "mmedit_vqa.json").read_text())[0], "image": "holiday.png",
           "image_rephrase": "holiday again.png", "m_loc": "street/dog.png", **extra}
    data = tmp_path / f"own{len(extra)}.json"
    data.write_text(json.dumps([rec]))
    return data, root


def test_any_image_names_subject_from_field_else_content_hash(tmp_path):
    import hashlib

    data, root = _own_images_record(tmp_path)
    c = load_mmedit(data, "vqa", image_root=root).cases[0]
    # no subject field, no benchmark naming: the picture's content hash (so image_rephrase is another subject)
    assert c.subject == "sha256:" + hashlib.sha256((root / "holiday.png").read_bytes()).hexdigest()
    assert c.image == str(root / "holiday.png") and c.image_rephrase == (str(root / "holiday again.png"),)
    assert load_vlkeb(data, image_root=root).cases[0].subject == c.subject
    # a record's own subject field wins, under an image root and in text-side mode alike
    named, _ = _own_images_record(tmp_path, subject="my dog Rex")
    assert load_mmedit(named, "vqa", image_root=root).cases[0].subject == "my dog Rex"
    side = load_mmedit(named, "vqa").cases[0]
    assert side.subject == "my dog Rex" and side.image_rephrase == (side.image,)  # one subject, one picture
    assert side.m_loc.image != side.image
    by_id, _ = _own_images_record(tmp_path, subject_id="rex-01")
    assert load_mmedit(by_id, "vqa", image_root=root).cases[0].subject == "rex-01"
    bad, _ = _own_images_record(tmp_path, subject="  ")
    with pytest.raises(DatasetError, match="field 'subject' must be a non-empty str"):
        load_mmedit(bad, "vqa", image_root=root)
    # benchmark naming is still read where present
    coco = load_mmedit(FIX / "mmedit_vqa.json", "vqa").cases[0]
    assert coco.subject == "coco:58350"


def test_counterfact_original_layout():
    ds = load_text_records(FIX / "counterfact_original.json", "counterfact")
    raw = json.loads((FIX / "counterfact_original.json").read_text())
    assert len(ds.cases) == 3 and ds.image_mode == "none"
    c = ds.cases[0]
    rw = raw[0]["requested_rewrite"]
    assert c.question == "The mother tongue of Danielle Darrieux is" and c.subject == rw["subject"]
    assert (c.target, c.pred) == (rw["target_new"]["str"], rw["target_true"]["str"])
    assert c.rephrase == raw[0]["paraphrase_prompts"][0]
    assert (c.loc.question, c.loc.target) == (raw[0]["neighborhood_prompts"][0], "French")
    assert ds.cases[1].question == "Toko Yasuda, the" and c.target not in c.revisions
    # the EasyEdit layout of the same facts still loads, and gives the same edits
    easy = load_text_records(FIX / "counterfact.json", "counterfact").cases
    assert [(e.question, e.target) for e in easy] == [(x.question, x.target) for x in ds.cases[:2]]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("requested_rewrite"), "missing field 'prompt'"),  # then read as EasyEdit's layout
        (lambda r: r["requested_rewrite"].update(prompt="no slot"), "one '{}' for the subject"),
        (lambda r: r["requested_rewrite"].pop("target_new"), "missing field 'target_new'"),
        (lambda r: r["requested_rewrite"]["target_true"].update(str=""), "target_true: field 'str'"),
        (lambda r: r.update(paraphrase_prompts=[]), "'paraphrase_prompts' must be a non-empty list"),
        (lambda r: r.update(neighborhood_prompts=[3]), r"neighborhood_prompts\[0\]"),
    ],
)
def test_counterfact_original_bad_records(tmp_path, mutate, match):
    recs = json.loads((FIX / "counterfact_original.json").read_text())
    mutate(recs[1])
    f = tmp_path / "cf.json"
    f.write_text(json.dumps(recs))
    with pytest.raises(DatasetError, match=match):
        load_text_records(f, "counterfact")
