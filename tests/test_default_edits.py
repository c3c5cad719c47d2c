"""Default edits work (``tune="auto"``): written and compiled at once, then checked on their own input and
tuned only when that input does not get the answer; each version's status is queryable (library, service,
CLI).

On the shipped easy-vqa LLaVA and CLIP: its bare answer to the red circle's colour question is "red", so
an edit saying "red" passes the check with its compiled adapter (no tuning), while "oval" for its shape
(bare: "rectangle") needs tuning. One tuning example per edit keeps each tuning in seconds.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from PIL import Image

from esg_memory.config import EditedModelConfig
from esg_memory.errors import TuningError, UnknownEditError
from esg_memory.model import ADAPTER_KIND, Adapter, EditedModel, EditStatus

FIX = Path(__file__).parent / "fixtures" / "easyvqa"
Q_SHAPE, Q_COLOR = "what shape is in the image?", "what color is the shape?"
FAST = EditedModelConfig(n_paraphrases=0, n_augmented_images=0, n_unrelated_questions=0)  # tune: the default


@pytest.fixture(scope="module")
def shipped():
    from esg_memory.loading import load_base_model, load_encoder

    base, proc = load_base_model("tiny-llava")
    return base, proc, load_encoder("esg-easyvqa-clip")


@pytest.fixture(scope="module")
def red_circle():
    with Image.open(FIX / "test_4.png") as im:
        return im.convert("RGB")


def _wrap(shipped, memory=None, config=FAST) -> EditedModel:
    from esg_memory.loading import new_memory

    base, proc, enc = shipped
    return EditedModel.wrap(base, proc, memory=memory or new_memory(enc, "esg-easyvqa-clip"), encoder=enc,
                            config=config)


def _bare(em, image, q) -> str:
    with em.disable_edits():
        return em.answer([image], [q])[0]


class _Gate:
    """Holds the wrapper's edited answers (so its checks) until released: the status while a job waits."""

    def __init__(self, em, monkeypatch):
        self.open = threading.Event()
        real = em.answer

        def held(*args, **kwargs):
            self.open.wait(60)
            return real(*args, **kwargs)

        monkeypatch.setattr(em, "answer", held)


def test_auto_is_the_default_everywhere():
    from esg_memory.cli import build_parser

    assert EditedModelConfig().tune == "auto"
    args = build_parser().parse_args(["add", "--question", "q?", "--answer", "a"])
    assert args.tune == "auto"
    with pytest.raises(SystemExit):  # the CLI's choices are the one list of modes
        build_parser().parse_args(["add", "--question", "q?", "--answer", "a", "--tune", "later"])


def test_add_checks_its_own_input_and_tunes_only_when_it_fails(shipped, red_circle, monkeypatch):
    em = _wrap(shipped)
    assert _bare(em, red_circle, Q_SHAPE) != "oval" and _bare(em, red_circle, Q_COLOR) == "red"
    gate = _Gate(em, monkeypatch)
    oval = em.add_edit(red_circle, Q_SHAPE, "oval")  # returns once written and compiled
    assert em.adapter(oval).kind == "compiled"  # live now, before any check or tuning
    assert em.edit_status(oval) == EditStatus(oval, 1, None, "pending")
    gate.open.set()
    reports = em.wait_for_tuning(timeout=120)
    assert [r.edit_id for r in reports] == [oval]  # its compiled adapter did not give "oval": tuned
    assert em.edit_status(oval) == EditStatus(oval, 1, True, "done")
    assert em.adapter(oval).kind != "compiled" and em.answer([red_circle], [Q_SHAPE]) == ["oval"]

    red = em.add_edit(red_circle, Q_COLOR, "red")
    assert em.wait_for_tuning(timeout=120) == []  # the check passed: nothing tuned
    assert em.edit_status(red) == EditStatus(red, 1, True, "none")
    assert em.adapter(red).kind == "compiled" and red not in em.tune_reports

    # per version: a revision starts unknown (never: not checked), a delete forgets it
    assert em.revise_edit(red, answer="crimson", tune="never") == 2
    assert em.edit_status(red) == EditStatus(red, 2, None, "none")
    assert em.check_edit(red) is False and em.edit_status(red).gives_answer is False
    em.delete_edit(red)
    with pytest.raises(UnknownEditError):
        em.edit_status(red)
    assert em.edit_status(oval).tuning == "done"  # the other edit's status is its own


def test_never_sync_and_background_keep_their_meaning(shipped, red_circle):
    em = _wrap(shipped)
    never = em.add_edit(red_circle, Q_COLOR, "red", tune="never")
    assert em.wait_for_tuning(timeout=120) == []
    assert em.edit_status(never) == EditStatus(never, 1, None, "none")  # not checked
    # sync tunes even though the compiled adapter already gives "red"; then checks
    em.tune_edit(never)
    assert em.edit_status(never) == EditStatus(never, 1, True, "done")
    assert em.tune_reports[never].edit_id == never


def test_a_failed_background_tuning_is_logged_and_reported(shipped, red_circle, monkeypatch, caplog):
    em = _wrap(shipped)

    def broken(*args, **kwargs):
        raise TuningError("no gradient today")

    monkeypatch.setattr(em.runtime, "tune", broken)
    with caplog.at_level(logging.WARNING, logger="esg_memory.model"):
        eid = em.add_edit(red_circle, Q_SHAPE, "oval")  # auto: the check fails, the tuning raises
        with pytest.raises(TuningError, match="no gradient"):
            em.wait_for_tuning(timeout=120)
    st = em.edit_status(eid)
    assert (st.gives_answer, st.tuning) == (False, "failed") and "no gradient" in st.error
    assert st.to_dict() == {"gives_answer": False, "tuning": "failed", "tuning_error": st.error}
    assert any("tuning failed" in r.getMessage() and f"edit {eid}" in r.getMessage() for r in caplog.records)
    assert em.adapter(eid).kind == "compiled" and eid in em.memory  # the edit stays, compiled


def test_status_after_a_reload_is_read_off_the_stored_adapter(shipped, red_circle, tmp_path):
    em = _wrap(shipped)
    oval = em.add_edit(red_circle, Q_SHAPE, "oval")
    red = em.add_edit(red_circle, Q_COLOR, "red")
    em.wait_for_tuning(timeout=120)
    em.save(tmp_path / "saved")
    again = _wrap(shipped, memory=tmp_path / "saved")
    assert Adapter.from_bytes(again.memory.attachment(oval, ADAPTER_KIND)).exact
    assert again.edit_status(oval) == EditStatus(oval, 1, True, "done")  # tuned to an exact match
    assert again.edit_status(red) == EditStatus(red, 1, None, "none")  # checked before, not recorded


def test_service_add_replies_and_reads_carry_the_status(shipped, red_circle, tmp_path, monkeypatch):
    from esg_memory.serve.service import EditService

    em = _wrap(shipped)
    svc = EditService(em, tmp_path / "mem")
    try:
        gate = _Gate(em, monkeypatch)
        reply = svc.add_edit(red_circle, Q_COLOR, "red")  # the model's default: auto, in the background
        assert reply["tune"] == {"mode": "auto", "status": "queued"}
        assert (reply["gives_answer"], reply["tuning"]) == (None, "pending")
        gate.open.set()
        em.wait_for_tuning(timeout=120)
        got = svc.get_edit(reply["id"])
        assert (got["gives_answer"], got["tuning"], got["tune_report"]) == (True, "none", None)
        listed = svc.list_edits()["edits"]
        assert [(e["id"], e["gives_answer"], e["tuning"]) for e in listed] == [(reply["id"], True, "none")]
        never = svc.add_edit(red_circle, Q_SHAPE, "oval", tune="never")
        assert (never["gives_answer"], never["tuning"], never["tune"]) == (None, "none", None)
    finally:
        svc.close()


def test_cli_add_checks_in_the_foreground_and_show_prints_the_status(tmp_path, capsys):
    from esg_memory.cli import EXIT_OK, main

    mem = ["--memory", str(tmp_path / "mem"), "--json"]
    rc = main([*mem, "add", "--image", str(FIX / "test_4.png"), "--question", Q_COLOR, "--answer", "red"])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    added = json.loads(out)
    assert (added["gives_answer"], added["tuning"]) == (True, "none")  # checked before the process exits
    assert main([*mem, "show", str(added["edit_id"])]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    # a new process: what the stored (compiled) adapter tells, the check it passed is not stored
    assert shown["answer"] == "red" and (shown["gives_answer"], shown["tuning"]) == (None, "none")
    assert main(["--memory", str(tmp_path / "mem"), "show", str(added["edit_id"])]) == EXIT_OK
    table = capsys.readouterr().out
    assert any(line.split() == ["tuning", "none"] for line in table.splitlines())
