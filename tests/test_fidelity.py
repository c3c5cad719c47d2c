"""Adapter fidelity (issue #15, part A): a tuned adapter gives its answer on phrasings it never saw.

Where vs what: the router keeps an adapter inside its edit's scope, so the adapter is tuned to give the
edit's answer whatever it is asked about the edit's picture (`EditedModelConfig.n_unrelated_questions`).
Measured at scale by ``benchmarks/bench_fidelity.py``; here one edit on the shipped easy-vqa LLaVA, with
phrasings written for this test (no training, tuning or calibration set holds them), the edit's adapter
forced in through ``route_keys=``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _memory_fixtures import HashKeyEncoder, shape_image
from PIL import Image

from esg_memory.config import EditedModelConfig
from esg_memory.errors import ConfigError
from esg_memory.memory import EditMemory
from esg_memory.model import EditedModel, tuning_examples
from esg_memory.scope import GENERIC_QUESTIONS

FIX = Path(__file__).resolve().parent / "fixtures" / "easyvqa"
# never used by training, tuning, calibration or bench_fidelity.py
NOVEL = [
    "tell me which colour this figure is.",
    "what hue has the drawn object?",
    "the figure in the picture is coloured how?",
    "colour of the figure, please?",
]


def test_tuning_examples_ask_unrelated_questions_about_the_edit_picture():
    m = EditMemory(HashKeyEncoder())
    eid = m.add(image=shape_image("red"), question="What color is the circle?", answer="crimson")
    edit = m.get(eid)
    rows = tuning_examples(m, edit, n_paraphrases=2, n_augmented=1, n_unrelated=5)
    asked = [q for _, q in rows]
    assert asked[0] == "What color is the circle?"
    assert asked[-5:] == list(GENERIC_QUESTIONS[:5])
    assert all(im is rows[0][0] for im, q in rows if q in GENERIC_QUESTIONS)  # the edit's own picture
    assert len(tuning_examples(m, edit, 2, 1, max_examples=4, n_unrelated=5)) == 4
    assert not set(GENERIC_QUESTIONS) & {q for _, q in tuning_examples(m, edit, 2, 1, n_unrelated=0)}


def test_the_config_field_is_checked_and_has_a_default():
    assert EditedModelConfig().n_unrelated_questions == 8
    with pytest.raises(ConfigError):
        EditedModelConfig(n_unrelated_questions=-1)


@pytest.fixture(scope="module")
def shipped():
    from esg_memory.encoders import ClipKeyEncoder
    from esg_memory.pretrained import EASYVQA_CLIP, load_easyvqa_llava, pretrained_path

    torch.manual_seed(0)
    model, proc = load_easyvqa_llava()
    return model, proc, ClipKeyEncoder(f"local-dir:{pretrained_path(EASYVQA_CLIP)}")


def _forced_answers(em: EditedModel, eid: int, image: Image.Image, prompts: list[str]) -> list[str]:
    keys = np.repeat(em.memory.keys_of(eid)[0][:1], len(prompts), axis=0)  # the edit's own anchor key
    assert (em.memory.route_ids(keys=keys) == eid).all()
    with torch.no_grad():
        return [
            a.strip().lower()
            for a in em.answer([image] * len(prompts), prompts, max_new_tokens=4, route_keys=keys)
        ]


def test_a_tuned_adapter_answers_phrasings_it_never_saw(shipped):
    model, proc, enc = shipped
    img = Image.open(FIX / "test_17.png").convert("RGB")  # a red circle of easy-vqa's test split
    hits = {}
    for n_unrelated in (0, 8):
        em = EditedModel.wrap(
            model,
            proc,
            memory=EditMemory(enc),
            encoder=enc,
            config=EditedModelConfig(n_unrelated_questions=n_unrelated),
        )
        eid = em.add_edit(img, "what color is the shape?", "purple", tune="sync")
        assert em.tune_reports[eid].exact  # both reach exact match on their own tuning examples
        hits[n_unrelated] = [a == "purple" for a in _forced_answers(em, eid, img, NOVEL)]
    # tuned on its input and rewrites only, the adapter keeps the old answer on most novel phrasings;
    # asked unrelated questions during tuning too, it gives the new answer on (nearly) all of them
    assert sum(hits[8]) >= len(NOVEL) - 1 and sum(hits[8]) > sum(hits[0]), hits
