"""The evaluation harness end to end: tiny runs producing every file, determinism, the CLI, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from esg_memory.cli import EXIT_OK, EXIT_REFUSED, main
from esg_memory.errors import ConfigError, InvalidInputError
from esg_memory.eval import METHODS, EvalConfig, run_eval, strip_timings

FIX = Path(__file__).parent / "fixtures" / "eval"
FILES = {
    "results.json",
    "results.md",
    "metrics_vs_edits.png",
    "scope_audit.png",
    "scope_pareto.png",
    "probes.json",
    "probes.jsonl",
    "audit.jsonl",
    "probe_images",
}
METRICS = ("reliability", "t_gen", "i_gen", "t_loc", "m_loc", "portability", "audit")


@pytest.fixture(scope="module")
def shipped():
    """The embedded easy-vqa LLaVA and CLIP, loaded once for the module."""
    import easy_vqa  # noqa: F401  (an [all] extra: missing means failing, never skipping)

    from esg_memory.loading import load_base_model, load_encoder

    return load_base_model("tiny-llava"), load_encoder("esg-easyvqa-clip")


@pytest.mark.slow  # end to end, several seconds; still run in CI
def test_easyvqa_run_writes_every_file_and_is_deterministic(tmp_path, shipped):
    model, enc = shipped
    # compiled adapters (tune="never") keep this fast; revisions and deletions are forced in
    cfg = EvalConfig(kind="easyvqa", edits=10, tune="never", seed=5, revise_rate=0.4, delete_rate=0.5)
    r1 = run_eval(cfg, tmp_path / "a", progress=False, model=model, encoder=enc)
    assert {p.name for p in (tmp_path / "a").iterdir()} == FILES
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["seed"] == 5 and on_disk["config"]["edits"] == 10
    assert on_disk["versions"]["torch"] and on_disk["versions"]["python"]
    assert on_disk["data"]["image_mode"] == "files" and on_disk["stream"]["n_adds"] == 10
    assert on_disk["stream"]["n_revisions"] > 0 and on_disk["stream"]["n_deletions"] > 0
    assert set(on_disk["methods"]) == set(METHODS)
    for m in METHODS:
        for proto in ("immediate", "retention"):
            v = on_disk["methods"][m][proto]
            assert set(METRICS) <= set(v) and v["portability"] is None  # easy-vqa has no portability
            assert 0 <= v["reliability"] <= 1 and v["m_loc"] is not None
    assert [p["n_edits"] for p in on_disk["curve"]] == [1, 10]
    bare = on_disk["methods"]["bare"]
    # the bare model run after the stream answers every probe exactly as before it: no residue at all
    assert bare["retention"]["t_loc"] == bare["retention"]["m_loc"] == bare["retention"]["hard_loc"] == 1.0
    assert bare["deletion"]["final"]["bits"] == 0.0 and bare["retention"]["routing"]["right_edit"] == 0.0
    ours = on_disk["methods"]["ours"]
    assert ours["retention"]["routing"]["right_edit"] > 0.5
    d = ours["deletion"]
    assert d["n_deleted"] == on_disk["stream"]["n_deletions"] and d["final"]["n_probes"] > 0
    if d["final"]["routed"] == 0.0:  # nothing else fires on a deleted edit's probes: exact, bit for bit
        assert d["final"]["bits"] == 0.0
    assert on_disk["methods"]["always_nearest"]["retention"]["routing"]["loc_any_edit"] == 1.0
    # where vs what: the adapter's half is measured with the right edit forced in, so it is the same for
    # every routing rule (the adapters are); the router's half differs by method
    fid = {m: json.dumps(v["retention"]["fidelity"], sort_keys=True) for m, v in on_disk["methods"].items()}
    assert len(set(fid.values())) == 1, fid
    f = on_disk["methods"]["ours"]["retention"]["fidelity"]
    assert all(f[k] is not None and 0 <= f[k] <= 1 for k in ("reliability", "t_gen", "i_gen"))
    assert on_disk["methods"]["bare"]["retention"]["routing"]["right_edit_by_kind"]["t_gen"] == 0.0
    # where, on both axes: ours' point and every global rule's sweep, recomputable from probes.json
    sc = on_disk["scope"]
    probes = json.loads((tmp_path / "a" / "probes.json").read_text())["columns"]
    assert len(probes["kind"]) == len(probes["ours_edit"]) == len(probes["joint_cosine"]) > 0
    gen = [
        k in ("reliability", "t_gen", "i_gen") and o >= 0
        for k, o in zip(probes["kind"], probes["owner_anchor"], strict=True)
    ]
    assert sc["n_gen_probes"] == sum(gen)
    assert sc["ours"]["recall"] == pytest.approx(ours["retention"]["routing"]["right_edit"])
    assert sc["ours"]["leak"] == pytest.approx(ours["retention"]["routing"]["loc_any_edit"])
    for name, curve in sc["curves"].items():
        assert curve[-1]["recall"] == curve[-1]["leak"] == 0.0, name  # above every cosine: nothing fires
        assert sc["oracle_at_our_leak"][name] >= 0.0
    # audit.jsonl: one labelled line per method, protocol and scored edit, the shares' own rule
    audit = [json.loads(t) for t in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    assert audit[0]["type"] == "header" and audit[0]["format"] == "esg-memory-eval-audit"
    for m in METHODS:
        for proto in ("immediate", "retention"):
            rows = [x for x in audit if x["type"] == "edit" and (x["method"], x["protocol"]) == (m, proto)]
            a = on_disk["methods"][m][proto]["audit"]
            ok = [x for x in rows if x["label"] != "unreliable"]
            assert len(rows) == on_disk["methods"][m][proto]["n_edits"] and len(ok) == a["n_successful"]
            for k in ("correct", "under", "over", "fail"):
                share = sum(x["label"] == k for x in ok) / len(ok) if ok else None
                assert share == (pytest.approx(a[k]) if ok else None), (m, proto, k)
    gone = {x["case"] for x in audit if x["type"] == "deletion" and x["method"] == "ours"}
    assert len(gone) == on_disk["stream"]["n_deletions"]
    shas = {p["image"] for x in audit if x["type"] == "case" for p in x["probes"]} - {None}
    assert shas == {p.stem for p in (tmp_path / "a" / "probe_images").iterdir()}
    md = (tmp_path / "a" / "results.md").read_text()
    assert "## scope on both axes" in md
    assert "## immediate" in md and "## retention" in md and "| ours |" in md and "Where vs what" in md

    r2 = run_eval(cfg, tmp_path / "b", progress=False, model=model, encoder=enc)
    assert strip_timings(r1) == strip_timings(r2)
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert strip_timings(again) == strip_timings(on_disk)


def test_pre_edit_outputs_only_before_editing(shipped):
    from esg_memory.eval.protocols import Scorer
    from esg_memory.loading import new_memory
    from esg_memory.model import EditedModel

    (base, proc), enc = shipped
    em = EditedModel.wrap(base, proc, memory=new_memory(enc, "esg-easyvqa-clip"), encoder=enc)
    pic = str(Path(__file__).parent / "fixtures" / "easyvqa" / "test_4.png")
    scorer = Scorer(em)
    keys = enc.encode([pic], ["what shape is in the image?"])
    pre = scorer.pre([(0, pic, "what shape is in the image?", "oval")], keys)
    assert pre[(0, "oval")].stage == "pre"
    em.add_edit(pic, "what shape is in the image?", "oval", tune="never")
    with pytest.raises(InvalidInputError, match="before the first edit"):
        scorer.pre([(0, pic, "what shape is in the image?", "oval")], keys)
    # post outputs: routed to the edit (fixed) vs to none, cached per (probe, target, edit, version)
    eid = em.memory.list()[0].id
    inj, bare = (
        scorer.post([(0, pic, "what shape is in the image?", "oval")], keys, [e], [v], real=False)[0]
        for e, v in ((eid, 1), (-1, 0))
    )
    assert inj.stage == bare.stage == "post" and inj.digest != bare.digest
    assert bare.digest == pre[(0, "oval")].digest  # the bare path is bit-identical to the pre-edit run
    runs = scorer.runs
    scorer.post([(0, pic, "what shape is in the image?", "oval")], keys, [eid], [1], real=True)
    assert scorer.runs == runs  # served from the cache


def test_cli_text_side_run_with_tuned_adapters(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "--json",
            "eval",
            "--kind",
            "vqa",
            "--data",
            str(FIX / "mmedit_vqa.json"),
            "--pool-dir",
            str(FIX / "pool"),
            "--model",
            "tiny-random-llava",
            "--clip",
            "subject-id+esg-easyvqa-clip",
            "--edits",
            "3",
            "--protocol",
            "retention",
            "--out",
            str(out),
            "--seed",
            "1",
            "--methods",
            "bare,ours,always_nearest",
        ]
    )
    captured = capsys.readouterr()
    assert rc == EXIT_OK, captured.err
    summary = json.loads(captured.out)
    assert set(summary["files"]) == FILES and {p.name for p in out.iterdir()} == FILES
    res = json.loads((out / "results.json").read_text())
    # probes.jsonl: probes.json's table a line per probe (ours, retention), the same values
    cols = json.loads((out / "probes.json").read_text())["columns"]
    lines = [json.loads(t) for t in (out / "probes.jsonl").read_text().splitlines()]
    assert len(lines) == len(cols["kind"]) == res["scope"]["n_gen_probes"] + res["scope"]["n_loc_probes"]
    for i, line in enumerate(lines):
        assert (line["protocol"], line["method"], line["probe"]) == ("retention", "ours", cols["probe"][i])
        assert (line["kind"], line["generated"], line["target"]) == (
            cols["kind"][i], cols["answer"][i], cols["target"][i]
        )
        assert line["exact_match"] == cols["em"][i] and line["margin"] == cols["ours_margin"][i]
        assert line["fired"] == (cols["ours_edit"][i] if cols["ours_edit"][i] >= 0 else None)
        assert line["score"] == cols["ours_score"][i] and line["joint_cosine"] == cols["joint_cosine"][i]
    assert any(line["fired"] is not None for line in lines)
    assert res["data"]["image_mode"] == "text-side" and res["config"]["encoder_spec"].startswith(
        "subject-id+"
    )
    assert list(res["methods"]) == ["bare", "ours", "always_nearest"]
    ours = res["methods"]["ours"]
    assert ours["immediate"] is None and ours["interaction"] is None
    # adapters tuned to an exact match: every live edit's own input gives its new answer
    assert ours["retention"]["reliability_em"] == 1.0 and ours["retention"]["reliability"] == 1.0
    assert summary["methods"]["ours"]["retention"]["t_loc"] is not None


def test_text_records_immediate_only(tmp_path):
    cfg = EvalConfig(
        kind="zsre",
        data=str(FIX / "zsre.json"),
        pool_dir=str(FIX / "pool"),
        model="tiny-random-llava",
        clip="esg-easyvqa-clip",
        edits=3,
        tune="never",
        protocol="immediate",
    )
    res = run_eval(cfg, tmp_path, progress=False)
    no_retention = {"scope_pareto.png", "probes.json", "probes.jsonl"}
    no_pictures = {"probe_images"}  # text records: the audit has no picture to show
    assert {p.name for p in tmp_path.iterdir()} == FILES - no_retention - no_pictures
    audit = [json.loads(t) for t in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {x["protocol"] for x in audit if x["type"] == "edit"} == {"immediate"}
    ours = res["methods"]["ours"]
    assert ours["retention"] is None and ours["interaction"] is None
    imm = ours["immediate"]
    assert imm["n_edits"] == 3 and imm["t_loc"] is not None and imm["reliability"] is not None
    assert imm["i_gen"] is None and imm["m_loc"] is None and imm["portability"] is None  # text data
    assert res["methods"]["image_only"]["immediate"]["routing"]["right_edit"] == 0.0  # no pictures at all
    assert [p["methods"]["ours"]["immediate"]["n_edits"] for p in res["curve"]] == [1, 3]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["eval", "--kind", "vqa"], "needs --data PATH"),
        (["eval", "--kind", "vlkeb", "--data", "/nonexistent/eval.json"], "does not exist"),
        (["eval", "--edits", "2000"], "need big=True"),
        (["eval", "--methods", "bare,grace"], "must include 'ours'"),
        (
            ["eval", "--kind", "vqa", "--data", str(FIX / "mmedit_vqa.json"), "--image-root", "/nonexistent"],
            "not a directory",
        ),
    ],
)
def test_cli_refusals_are_one_line(capsys, argv, match):
    assert main(argv) == EXIT_REFUSED
    err = capsys.readouterr().err.strip()
    assert err.startswith("esg-memory: error:") and match in err and "\n" not in err


def test_config_validation():
    for bad in (
        dict(protocol="later"),
        dict(edits=0),
        dict(tune="background"),
        dict(methods=("x",)),
        dict(immediate_sample=0),
        dict(tune_lr=0.0),
        dict(tune_max_steps=0),
        dict(tune_examples=0),
        dict(tune_patience=0),
    ):
        with pytest.raises(ConfigError):
            EvalConfig(**bad).validate()
    EvalConfig(edits=5000, big=True).validate()
    assert np.all(np.asarray(METHODS) != "")


@pytest.mark.slow  # the scenes world end to end on its shipped models; a few seconds
def test_cli_scenes_run_uses_the_worlds_models(tmp_path, capsys):
    out = tmp_path / "scenes"
    argv = ["--json", "eval", "--kind", "scenes", "--edits", "4", "--tune", "never", "--out", str(out)]
    argv += ["--immediate-sample", "2", "--delete-rate", "0", "--tune-lr", "0.8", "--tune-steps", "60"]
    rc = main([*argv, "--methods", "bare,ours,global_threshold,grace", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == EXIT_OK, captured.err
    res = json.loads((out / "results.json").read_text())
    # no --model / --clip: the kind brings its own world's models, memory config and pool
    assert res["model"]["spec"] == "esg-scenes-llava" and res["config"]["encoder_spec"] == "esg-scenes-clip"
    assert res["data"]["kind"] == "scenes" and res["data"]["pool_size"] == 256
    assert res["config"]["tune_lr"] == 0.8 and res["config"]["tune_max_steps"] == 60
    assert res["timings"]["tuning"] is None  # --tune never: nothing tuned, nothing to summarise
    ours = res["methods"]["ours"]["retention"]
    assert ours["i_t_gen"] is not None and ours["fidelity"]["i_t_gen"] is not None  # both held out at once
    assert res["methods"]["bare"]["retention"]["m_loc"] == 1.0
    # immediate scored on a seeded sample of 2 of the 4 edits; retention on every live one
    assert res["methods"]["ours"]["immediate"]["n_edits"] == 2 and ours["n_edits"] == 4
    stages = res["timings"]["stages"]
    assert {"encode", "scope", "probe_immediate", "probe_retention"} <= set(stages)
    assert stages["scope"]["calls"] == res["stream"]["n_adds"] + res["stream"]["n_revisions"]
    assert set(res["scope"]["curves"]) == {"global_joint", "global_text", "global_image", "grace"}
