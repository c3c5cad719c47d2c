"""Generated positives: image augmentations keep the subject, question templates keep the meaning."""

from __future__ import annotations

import numpy as np
import pytest
from _encoders_fixtures import COLORS, png_bytes, shape_image

from esg_memory.augment import AugmentBounds, augment_image, question_templates
from esg_memory.errors import ImageError, InvalidInputError


def _subject_pixels(img, color: str) -> np.ndarray:
    """Pixels within a small distance of the shape's colour."""
    a = np.asarray(img, dtype=np.float32)
    return np.linalg.norm(a - np.array(COLORS[color], dtype=np.float32), axis=2) < 60


def test_views_have_the_original_size_and_are_deterministic(tmp_path):
    img = shape_image("red", "circle")
    views = augment_image(img, 6, seed=3)
    assert len(views) == 6 and all(v.size == img.size and v.mode == "RGB" for v in views)
    again = augment_image(img, 6, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, again, strict=True))
    other = augment_image(img, 6, seed=4)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, other, strict=True))
    # view i does not depend on how many views were asked for
    assert np.array_equal(np.asarray(augment_image(img, 2, seed=3)[1]), np.asarray(views[1]))
    # any ImageLike: path and bytes give the same views as the PIL image
    p = tmp_path / "x.png"
    img.save(p)
    for src in (p, png_bytes(img)):
        assert np.array_equal(np.asarray(augment_image(src, 1, seed=3)[0]), np.asarray(views[0]))
    assert augment_image(img, 0) == []


def test_views_differ_from_the_original_but_keep_subject_and_colour():
    img = shape_image("blue", "rectangle")
    base = _subject_pixels(img, "blue").sum()
    views = augment_image(img, 20, seed=0)
    assert sum(not np.array_equal(np.asarray(v), np.asarray(img)) for v in views) == 20
    flips = 0
    for v in views:
        kept = _subject_pixels(v, "blue").sum()
        # a crop keeps >= 80% of the area and is resized back: the shape stays mostly visible
        assert kept >= 0.7 * base
        a = np.asarray(v, dtype=np.float32)[_subject_pixels(v, "blue")]
        # still blue: blue channel dominates red and green on the subject
        assert (a[:, 2] > a[:, 0] + 80).all() and (a[:, 2] > a[:, 1] + 80).all()
    # an asymmetric image shows whether flips happen at a plausible rate
    tri = shape_image("red", "triangle", offset=-10)
    for v in augment_image(tri, 40, seed=1):
        m = _subject_pixels(v, "red")
        cols = np.nonzero(m.any(0))[0]
        flips += cols.mean() > tri.size[0] / 2
    assert 8 <= flips <= 32
    assert 0 < AugmentBounds.min_area < 1


def test_augment_bad_arguments():
    img = shape_image()
    for n in (-1, 1.5, "3", True):
        with pytest.raises(InvalidInputError):
            augment_image(img, n)
    with pytest.raises(InvalidInputError):
        augment_image(img, 1, seed="a")
    with pytest.raises(ImageError):
        augment_image(b"not an image", 2)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is the capital of France?", "Can you tell me what the capital of France is?"),
        ("what color is the shape?", "Can you tell me what color the shape is?"),
        ("what shape is in the image?", "Can you tell me what shape is in the image?"),
        ("is there a red shape?", "Can you tell me whether there is a red shape?"),
        ("Who wrote Hamlet?", "Tell me: who wrote Hamlet?"),
    ],
)
def test_question_templates_rules(question, expected):
    out = question_templates(question)
    assert expected in out
    assert out[0] == expected or not expected.startswith("Can you")
    assert question not in out and len(out) == len(set(out))
    assert question_templates(question) == out  # deterministic
    assert question_templates(question, n=2) == out[:2]
    # every template still contains the question's content words
    words = {w for w in question.lower().rstrip("?").split() if len(w) > 3}
    assert all(words <= set(t.lower().replace("?", " ").replace(".", " ").split()) for t in out)


def test_question_templates_bad_input():
    for q in ("", "   ", None, 3):
        with pytest.raises(InvalidInputError):
            question_templates(q)
    with pytest.raises(InvalidInputError):
        question_templates("What?", n=-1)
    assert question_templates("What?", n=0) == []
