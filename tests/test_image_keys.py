"""Images are hashed once from their bytes or pixels: content keys, the encoders' cache, stored blob ids."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from _encoders_fixtures import png_bytes, shape_image
from PIL import Image

from esg_memory import images
from esg_memory.encoders import TINY_CLIP_NAME, ClipKeyEncoder
from esg_memory.errors import ImageError
from esg_memory.images import keyed_image, load_image


def _no_png(monkeypatch):
    """From now on any PIL encode (``Image.save``) fails the test."""

    def refuse(self, *a, **kw):
        raise AssertionError("an image was encoded on the hot path")

    monkeypatch.setattr(Image.Image, "save", refuse)


def _no_decode(monkeypatch):
    """From now on any decode of encoded bytes (``Image.open``) fails the test."""

    def refuse(*a, **kw):
        raise AssertionError("image bytes were decoded on a cache hit")

    monkeypatch.setattr(Image, "open", refuse)


@pytest.fixture(scope="module")
def enc():
    return ClipKeyEncoder(TINY_CLIP_NAME)


def test_equal_pixels_equal_keys_and_any_change_another_key():
    a, b = shape_image("red", "circle"), shape_image("red", "circle")
    assert a is not b and keyed_image(a).key == keyed_image(b).key
    assert keyed_image(a).key != keyed_image(shape_image("blue", "circle")).key  # pixels
    assert keyed_image(a).key != keyed_image(shape_image("red", "circle", offset=1)).key
    assert keyed_image(a).key != keyed_image(shape_image("red", "circle", size=65)).key  # size
    one = a.copy()
    one.putpixel((0, 0), (254, 255, 255))
    assert keyed_image(a).key != keyed_image(one).key
    # the same raw bytes laid out in another size are other pixels
    raw = bytes(range(24))
    assert (
        keyed_image(Image.frombytes("RGB", (2, 4), raw)).key
        != keyed_image(Image.frombytes("RGB", (4, 2), raw)).key
    )


def test_modes_are_keyed_by_the_rgb_pixels_an_encoder_sees():
    idx = Image.frombytes("L", (4, 1), bytes([0, 1, 2, 3]))
    warm, cold = idx.convert("P"), idx.convert("P")
    warm.putpalette([255, 0, 0, 200, 50, 0, 150, 100, 0, 100, 150, 0])
    cold.putpalette([0, 0, 255, 0, 50, 200, 0, 100, 150, 0, 150, 100])
    # same mode, size and raw bytes (palette indices), other colours: other keys
    assert warm.tobytes() == cold.tobytes()
    assert keyed_image(warm).key != keyed_image(cold).key
    # the same raw bytes read as grey levels are yet other pixels
    assert keyed_image(idx).key not in (keyed_image(warm).key, keyed_image(cold).key)
    # another mode with the same RGB pixels gives the same embedding, hence may share the key
    assert keyed_image(warm).key == keyed_image(warm.convert("RGB")).key
    grey = shape_image("red", "circle").convert("L")
    assert keyed_image(grey).key == keyed_image(grey.convert("RGB")).key
    rgba = shape_image("red", "circle").convert("RGBA")
    assert keyed_image(rgba).key == keyed_image(shape_image("red", "circle")).key


def test_bytes_and_files_are_keyed_by_their_blob_id(tmp_path):
    data = png_bytes(shape_image("green", "triangle"))
    p = tmp_path / "g.png"
    p.write_bytes(data)
    blob = hashlib.sha256(data).hexdigest()
    assert keyed_image(data).key == keyed_image(p).key == keyed_image(str(p)).key == blob
    assert keyed_image(bytearray(data)).key == keyed_image(memoryview(data)).key == blob
    assert load_image(data).sha256 == load_image(p).sha256 == blob
    # a PIL key is never mistaken for a blob id
    assert keyed_image(shape_image("green", "triangle")).key != blob


def test_keying_refuses_what_load_image_refuses(tmp_path, monkeypatch):
    for bad in (b"", tmp_path / "missing.png", tmp_path, 3, Image.new("RGB", (0, 0))):
        with pytest.raises(ImageError):
            keyed_image(bad)
    with pytest.raises(ImageError, match="not a decodable image"):
        keyed_image(b"not an image").rgb()  # keyed as bytes; refused as soon as its pixels are needed
    with monkeypatch.context() as m:
        m.setattr(images, "MAX_IMAGE_PIXELS", 100)
        with pytest.raises(ImageError, match="pixel limit"):
            keyed_image(Image.new("RGB", (11, 10)))
    with monkeypatch.context() as m:
        m.setattr(images, "MAX_IMAGE_BYTES", 10)
        with pytest.raises(ImageError, match="byte limit"):
            keyed_image(png_bytes(Image.new("RGB", (2, 2))))


def test_encoding_a_pil_image_never_png_encodes_it(enc, monkeypatch):
    img = shape_image("red", "circle")
    want = ClipKeyEncoder(TINY_CLIP_NAME, cache_size=0).encode([png_bytes(img)], ["what shape?"])
    fresh = ClipKeyEncoder(TINY_CLIP_NAME)
    _no_png(monkeypatch)
    grey = shape_image("blue", "rectangle").convert("L")
    got = fresh.encode([img, grey, img.copy()], ["what shape?", "what shape?", None])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)  # same pixels as the PNG: same key
    # the third row is the first one's pixels in another object: a hit within the call
    info = fresh.cache_info()
    assert (info.misses, info.hits) == (3, 2)  # and the repeated text


def test_a_cache_hit_decodes_nothing(monkeypatch):
    e = ClipKeyEncoder(TINY_CLIP_NAME)
    data = png_bytes(shape_image("yellow", "circle"))
    first = e.encode_images([data])
    _no_decode(monkeypatch)
    np.testing.assert_array_equal(e.encode_images([data]), first)
    assert e.cache_info().hits == 1


def test_bad_bytes_in_a_later_batch_still_leave_the_cache_unchanged():
    e = ClipKeyEncoder(TINY_CLIP_NAME, batch_size=1)
    good = png_bytes(shape_image("red", "rectangle"))
    with pytest.raises(ImageError):
        e.encode_images([good, shape_image("blue", "circle"), b"not an image"])
    assert e.cache_info().size == 0
    # and a good call afterwards works and fills it
    assert e.encode_images([good]).shape == (1, e.dim) and e.cache_info().size == 1


def test_routing_a_pil_image_never_png_encodes_it_and_blob_ids_are_unchanged(tmp_path, monkeypatch):
    from esg_memory import EditMemory

    mem = EditMemory(ClipKeyEncoder(TINY_CLIP_NAME))
    img = shape_image("red", "circle")
    p = tmp_path / "b.png"
    p.write_bytes(png_bytes(shape_image("blue", "triangle")))
    by_pil = mem.add(image=img, question="what shape is this?", answer="a circle")
    by_path = mem.add(image=p, question="what colour is this?", answer="blue")
    # the blob id written for an added image: the SHA-256 of its PNG bytes (PIL) or of its file bytes
    assert mem.get(by_pil).image == hashlib.sha256(png_bytes(img.convert("RGB"))).hexdigest()
    assert mem.get(by_pil).image == load_image(img).sha256
    assert mem.get(by_path).image == hashlib.sha256(p.read_bytes()).hexdigest()
    assert png_bytes(mem.open_image(mem.get(by_pil).image)) == png_bytes(img)
    _no_png(monkeypatch)
    routed = mem.route([img.copy(), shape_image("red", "circle")], ["what shape is this?"] * 2)
    assert routed.edit_ids.tolist() == [by_pil, by_pil]


def test_allowed_root_is_checked_on_the_file_opened(tmp_path, monkeypatch):
    # a symlink swapped in after the path was resolved must not let a read escape the root: the check
    # runs on what was opened (simulated: the resolve step sees the path as it was before the swap)
    from pathlib import Path

    root, outside = tmp_path / "root", tmp_path / "secret.png"
    root.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(outside)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(root / "ok.png")
    assert images.load_image("ok.png", allowed_root=root).image.getpixel((0, 0)) == (9, 9, 9)
    (root / "swapped.png").symlink_to(outside)
    with pytest.raises(ImageError, match="outside the allowed root"):
        images.load_image("swapped.png", allowed_root=root)  # refused by the resolve check already
    def seen_before_the_swap(path, allowed_root):  # the resolve step, as it saw the path before the swap
        return path if allowed_root is None else Path(allowed_root) / path

    monkeypatch.setattr(images, "_resolve", seen_before_the_swap)
    with pytest.raises(ImageError, match="outside the allowed root"):
        images.load_image("swapped.png", allowed_root=root)
    assert images.load_image("ok.png", allowed_root=root).image.getpixel((0, 0)) == (9, 9, 9)
    assert images.load_image(outside).image.getpixel((0, 0)) == (1, 2, 3)  # no root: any path


def test_exif_orientation_is_honoured_and_the_bytes_kept():
    import io

    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    data = buf.getvalue()
    got = load_image(data)
    assert got.image.size == (20, 40)  # as a viewer shows it
    assert got.data == data and got.sha256 == hashlib.sha256(data).hexdigest()  # stored as given
    assert images.decode_image(data).size == (20, 40)
    assert keyed_image(data).rgb().size == (20, 40)  # what the encoders see
