"""The `esg-memory` command line, end to end on the embedded default models in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esg_memory.cli import EXIT_OK, EXIT_REFUSED, main

FIX = Path(__file__).parent / "fixtures" / "easyvqa"


def _pictures() -> list[Path]:
    """A red circle, a blue rectangle (held-out easy-vqa pictures, see fixtures/easyvqa/README.md)."""
    return [FIX / "test_4.png", FIX / "test_23.png"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv: str):
    rc, out, err = run(capsys, "--json", *argv)
    assert rc == EXIT_OK, err
    return json.loads(out)


@pytest.fixture
def mem(tmp_path) -> list[str]:
    return ["--memory", str(tmp_path / "mem"), "--clip", "esg-easyvqa-clip"]


def test_add_list_show_revise_rollback_history_delete(capsys, mem):
    pics = _pictures()
    added = run_json(
        capsys,
        *mem,
        "add",
        "--image",
        str(pics[0]),
        "--question",
        "what shape is in the image?",
        "--answer",
        "oval",
        "--positive",
        "what shape does the image contain?",
        "--tune",
        "never",  # the default (auto) loads the model to check and tune: test_default_edits.py covers it
    )
    eid = added["edit_id"]
    assert added["version"] == 1
    second = run_json(
        capsys,
        *mem,
        "add",
        "--image",
        str(pics[1]),
        "--question",
        "what color is the shape?",
        "--answer",
        "cobalt",
        "--tune",
        "never",
    )
    assert second["edit_id"] != eid

    listed = run_json(capsys, *mem, "list")
    assert sorted(e["id"] for e in listed) == sorted([eid, second["edit_id"]])
    shown = run_json(capsys, *mem, "show", str(eid))
    assert shown["answer"] == "oval" and shown["question"] == "what shape is in the image?"

    revised = run_json(capsys, *mem, "revise", str(eid), "--answer", "ellipse", "--tune", "never")
    assert revised["version"] == 2
    assert run_json(capsys, *mem, "show", str(eid))["answer"] == "ellipse"
    assert run_json(capsys, *mem, "rollback", str(eid), "--version", "1")["version"] == 3
    hist = run_json(capsys, *mem, "history", str(eid))
    assert [v["answer"] for v in hist] == ["oval", "ellipse", "oval"]

    routed = run_json(
        capsys, *mem, "route", "--image", str(pics[0]), "--question", "what shape is in the image?"
    )
    assert routed["edit_id"] == eid and routed["margin"] >= 0
    unrelated = run_json(capsys, *mem, "route", "--question", "who wrote hamlet?")
    assert unrelated["edit_id"] == -1

    run_json(capsys, *mem, "delete", str(eid))
    assert [e["id"] for e in run_json(capsys, *mem, "list")] == [second["edit_id"]]
    routed = run_json(
        capsys, *mem, "route", "--image", str(pics[0]), "--question", "what shape is in the image?"
    )
    assert routed["edit_id"] == -1


def test_table_output_is_readable(capsys, mem):
    pics = _pictures()
    run(
        capsys,
        *mem,
        "add",
        "--image",
        str(pics[0]),
        "--question",
        "what shape is in the image?",
        "--answer",
        "oval",
        "--tune",
        "never",
    )
    rc, out, _ = run(capsys, *mem, "list")
    assert rc == EXIT_OK
    assert out.splitlines()[0].startswith("| id") and "oval" in out


def test_errors_are_one_line_with_exit_code(capsys, mem, tmp_path, monkeypatch):
    monkeypatch.delenv("ESG_MEMORY_DIR", raising=False)
    rc, out, err = run(capsys, *mem, "show", "12345")
    assert rc == EXIT_REFUSED and out == ""
    assert err.startswith("esg-memory: error:") and len(err.strip().splitlines()) == 1
    rc, _, err = run(
        capsys, *mem, "add", "--image", str(tmp_path / "missing.png"), "--question", "q?", "--answer", "a",
        "--tune", "never",
    )
    assert rc == EXIT_REFUSED and "not found" in err and "Traceback" not in err
    assert run_json(capsys, *mem, "list") == []  # the failed add left nothing behind
    rc, _, err = run(capsys, "list")  # no --memory (and no ESG_MEMORY_DIR): refused, not a crash
    assert rc == EXIT_REFUSED and "--memory" in err


@pytest.mark.slow  # end to end, several seconds; still run in CI
def test_generate_applies_a_tuned_edit(capsys, mem):
    pics = _pictures()
    q = "what shape is in the image?"
    before = run_json(capsys, *mem, "generate", "--image", str(pics[0]), "--prompt", q)
    assert before["edit_id"] == -1
    added = run_json(
        capsys, *mem, "add", "--image", str(pics[0]), "--question", q, "--answer", "oval", "--tune", "sync"
    )
    after = run_json(capsys, *mem, "generate", "--image", str(pics[0]), "--prompt", q)
    assert after["edit_id"] == added["edit_id"]
    assert after["text"] == "oval"
    other = run_json(
        capsys, *mem, "generate", "--image", str(pics[0]), "--prompt", "what color is the shape?"
    )
    assert other["edit_id"] == -1


def test_bench_runs_a_benchmark_script(capsys, tmp_path):
    out = tmp_path / "bench.json"
    rc, text, _ = run(capsys, "bench", "index", "--sizes", "1000", "--backends", "flat", "--out", str(out))
    assert rc == EXIT_OK
    assert "flat" in text and json.loads(out.read_text())


def test_global_options_work_after_the_command_too(tmp_path):
    # `esg-memory list --memory m --json` (as users type it), in a real process
    import subprocess
    import sys

    d = str(tmp_path / "mem")
    env_cmd = [sys.executable, "-m", "esg_memory.cli"]
    add = subprocess.run(
        [
            *env_cmd,
            "add",
            "--memory",
            d,
            "--clip",
            "esg-easyvqa-clip",
            "--question",
            "what is the capital of france?",
            "--answer",
            "lyon",
            "--tune",
            "never",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert add.returncode == EXIT_OK, add.stderr
    assert json.loads(add.stdout)["edit_id"] == 0
    got = subprocess.run(
        [*env_cmd, "--memory", d, "list", "--json"], capture_output=True, text=True, timeout=300
    )
    after = subprocess.run(
        [*env_cmd, "list", "--memory", d, "--json"], capture_output=True, text=True, timeout=300
    )
    assert got.returncode == after.returncode == EXIT_OK, (got.stderr, after.stderr)
    assert (
        json.loads(got.stdout) == json.loads(after.stdout) and json.loads(after.stdout)[0]["answer"] == "lyon"
    )
    # given on both sides, the one after the command wins
    other = str(tmp_path / "other")
    both = subprocess.run(
        [*env_cmd, "--memory", other, "list", "--memory", d, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(both.stdout) == json.loads(after.stdout)


# ------------------------------------------------------------------- --device / --dtype / --device-map


def test_placement_options_are_checked_before_anything_loads(capsys, mem, monkeypatch):
    import sys

    from esg_memory.cli import build_parser

    gen = ["generate", "--prompt", "what shape is in the image?"]
    rc, _, err = run(capsys, *mem, "--device", "cpu", "--device-map", "auto", *gen)
    assert rc == EXIT_REFUSED and "not both" in err
    rc, _, err = run(capsys, *mem, "--device", "warp-drive", *gen)
    assert rc == EXIT_REFUSED and "warp-drive" in err
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if it were not installed
    rc, _, err = run(capsys, *mem, *gen, "--device-map", "auto")
    assert rc == EXIT_REFUSED and "esg-memory[accelerate]" in err
    with pytest.raises(SystemExit):  # one table of dtype names
        build_parser().parse_args(["--dtype", "float64", *gen])
    # declared once, for every command, before or after its name; eval reads the same ones
    for argv in (["--device", "cuda", "--dtype", "float16", "eval"], ["eval", "--device", "cuda", "--dtype",
                                                                        "float16"]):
        args = build_parser().parse_args(argv)
        assert (args.device, args.dtype, args.device_map) == ("cuda", "float16", None)
    assert build_parser().parse_args(["route", "--device-map", "auto"]).device_map == "auto"
    rc, _, err = run(capsys, *mem, "eval", "--device-map", "auto")
    assert rc == EXIT_REFUSED and "--device" in err


def test_load_base_model_places_and_casts(tmp_path):
    import torch

    from esg_memory.errors import ConfigError
    from esg_memory.loading import MODEL_SPECS, load_base_model, register_model_spec
    from esg_memory.tiny import build_tiny

    calls = []
    register_model_spec("test-placement-spy", lambda: calls.append(1))
    assert "test-placement-spy" in MODEL_SPECS
    for bad in ({"dtype": "float64"}, {"device": "cpu", "device_map": "auto"}, {"device": "warp"},
                {"device_map": "warp"}):
        with pytest.raises(ConfigError):
            load_base_model("test-placement-spy", **bad)
    assert calls == []  # refused before loading
    model, _ = load_base_model("tiny-random-llava", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu") and not model.training
    model, _ = load_base_model("tiny-random-llava", device_map="auto")  # accelerate places it (the CPU here)
    assert model.device.type == "cpu"
    # a model directory: transformers' from_pretrained(dtype=) loads it in that dtype
    saved, proc = build_tiny("llava", seed=0)
    saved.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    model, _ = load_base_model(tmp_path / "model", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16


def test_generate_with_dtype_in_a_real_process(tmp_path):
    # `esg-memory --dtype bfloat16 generate ...` as users type it: the model is loaded in that dtype
    import subprocess
    import sys

    pic = str(_pictures()[0])
    argv = [sys.executable, "-m", "esg_memory.cli", "--memory", str(tmp_path / "m"), "--json", "--debug",
            "--dtype", "bfloat16", "--device", "cpu", "generate", "--image", pic, "--prompt", "what color?"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-2000:]
    assert "loaded on cpu as torch.bfloat16" in done.stderr
    assert json.loads(done.stdout)["edit_id"] == -1 and isinstance(json.loads(done.stdout)["text"], str)


def test_generate_with_float32_in_process(capsys, mem, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="esg_memory.cli"):
        got = run_json(capsys, *mem, "--dtype", "float32", "--device", "cpu", "generate", "--image",
                       str(_pictures()[0]), "--prompt", "what shape is in the image?")
    assert got["edit_id"] == -1 and got["text"]
    assert any("as torch.float32" in r.getMessage() for r in caplog.records)


def test_add_with_negatives_keeps_them_out_of_the_scope(capsys, mem, tmp_path):
    red, blue = (str(p) for p in _pictures())
    q, near = "what shape is in the image?", "which shape is this?"
    base = ["add", "--image", red, "--question", q, "--answer", "oval", "--tune", "never"]
    plain = ["--memory", str(tmp_path / "plain"), "--clip", "esg-easyvqa-clip"]
    run_json(capsys, *plain, *base)
    assert run_json(capsys, *plain, "route", "--image", red, "--question", near)["edit_id"] >= 0

    eid = run_json(capsys, *mem, *base, "--negative", near, "--negative-image", blue)["edit_id"]
    assert run_json(capsys, *mem, "route", "--image", red, "--question", near)["edit_id"] == -1
    assert run_json(capsys, *mem, "route", "--image", red, "--question", q)["edit_id"] == eid
    fb = run_json(capsys, *mem, "history", str(eid))[-1]["feedback"]
    red_sha = run_json(capsys, *mem, "show", str(eid))["image"]
    assert [(f["kind"], f["text"], f["image"] == red_sha) for f in fb] == [("negative", near, True),
                                                                             ("negative", q, False)]
    rc, _, err = run(capsys, *mem, "add", "--image", red, "--question", q, "--answer", "x", "--negative", q,
                     "--tune", "never")
    assert rc == EXIT_REFUSED and "own input" in err
