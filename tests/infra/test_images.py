"""decode_image: phone photos come out upright, and each unusable file gets its own plain reason and fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from infra.images import decode_image
from infra.spec import BadInputError


def _jpeg(size: tuple[int, int], orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # what a phone held upright writes beside its sideways sensor data
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize(("orientation", "turn"), [
    (6, Image.Transpose.ROTATE_270),  # shot in portrait, stored sideways
    (8, Image.Transpose.ROTATE_90),
    (3, Image.Transpose.ROTATE_180),
])
def test_a_photo_with_an_exif_orientation_is_decoded_upright(orientation: int, turn: Image.Transpose) -> None:
    raw = _jpeg((96, 64), orientation)
    stored = Image.open(io.BytesIO(raw)).convert("RGB")
    decoded = decode_image(raw, "phone.jpg", max_pixels=1_000_000)
    assert decoded.size == stored.transpose(turn).size
    assert np.array_equal(np.asarray(decoded), np.asarray(stored.transpose(turn)))


def test_a_photo_without_orientation_is_left_as_stored() -> None:
    raw = _jpeg((96, 64))
    assert np.array_equal(np.asarray(decode_image(raw, "a.jpg", 1_000_000)),
                          np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))


def problem_of(raw: bytes, max_pixels: int = 1_000_000) -> tuple[str, str]:
    with pytest.raises(BadInputError) as caught:
        decode_image(raw, "in/item.png", max_pixels)
    (problem,) = caught.value.report.problems
    assert problem.field == "image" and caught.value.report.error == "invalid_image"
    return problem.problem, problem.fix


def test_a_text_file_is_named_as_not_an_image_without_python_internals() -> None:
    problem, fix = problem_of(b"this is text, not a PNG")
    assert problem == "in/item.png: not an image file (it starts with b'this is text')"
    assert "PNG, JPEG or WebP" in fix


def test_a_tiny_image_is_too_small_not_too_large() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    problem, fix = problem_of(out.getvalue())
    assert "8x8 is too small" in problem and "resize" not in fix and "512" in fix


def test_an_image_over_the_pixel_limit_says_the_limit() -> None:
    problem, fix = problem_of(_jpeg((96, 64)), max_pixels=5_000)
    assert problem == "in/item.png: 96x64 is 6,144 pixels, over the 5,000 pixel limit"
    assert "resize" in fix
