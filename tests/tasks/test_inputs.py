"""load-inputs on a real folder: what it hands to the GPU worker is the dropped file itself, and the
renderer decodes it to the very pixels that validation decoded."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.images import decode_image
from infra.jobs import JobTicket
from infra.spec import BadInputError
from tasks.inputs import load_inputs


def _ticket(inbox: Path, image_name: str, spec_name: str) -> JobTicket:
    digest = {name: hashlib.sha256((inbox / name).read_bytes()).hexdigest() for name in (image_name, spec_name)}
    return JobTicket(job_id="j1", stem="item", inbox=str(inbox), outbox=str(inbox / "out"), image_key=image_name,
                     spec_key=spec_name, image_sha256=digest[image_name], spec_sha256=digest[spec_name])


def _photo(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize(("name", "mode", "save"), [
    ("item.jpg", "RGB", {"format": "JPEG", "quality": 90}),
    ("item.png", "RGBA", {"format": "PNG"}),  # transparency: the renderer takes RGB
    ("item.png", "P", {"format": "PNG"}),  # a palette image
    ("item.webp", "RGB", {"format": "WEBP", "lossless": False}),
])
def test_the_dropped_file_goes_to_the_renderer_unchanged(tmp_path: Path, name: str, mode: str,
                                                          save: dict[str, object]) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    encoded = io.BytesIO()
    _photo(mode, (96, 64)).save(encoded, **save)
    (inbox / name).write_bytes(encoded.getvalue())
    (inbox / "item.json").write_text('{"prompt": "product rotating slowly under studio light"}')

    job = load_inputs.fn(_ticket(inbox, name, "item.json"))

    assert job.image_file == encoded.getvalue(), "the image must travel as dropped, not re-encoded"
    assert job.image_size == (96, 64)
    rendered_from = job.rgb_image()
    assert rendered_from.mode == "RGB" and rendered_from.size == (96, 64)
    validated = decode_image(encoded.getvalue(), name, max_pixels=10_000)
    assert np.array_equal(np.asarray(rendered_from), np.asarray(validated))


@pytest.mark.parametrize("model", ["ali-vilab/i2vgen-x", "/srv/models/anything", "i2vgen"])
def test_a_model_the_service_does_not_offer_is_bad_input_before_any_gpu_time(tmp_path: Path, model: str) -> None:
    """A typo'd hub id must not reach the GPU worker, where it would be fetched, fail and be retried."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    _photo("RGB", (64, 64)).save(inbox / "item.png")
    (inbox / "item.json").write_text(f'{{"prompt": "p", "model": "{model}"}}')

    with pytest.raises(BadInputError) as caught:
        load_inputs.fn(_ticket(inbox, "item.png", "item.json"))

    report = caught.value.report
    assert report.error == "unknown_model"
    (problem,) = report.problems
    assert problem.field == "model" and repr(model) in problem.problem and "item.json" in problem.problem
    assert "tiny" in problem.fix and "i2vgen-xl" in problem.fix and "I2VFLOW_JOB_MODELS" in problem.fix


def test_an_offered_model_passes(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    _photo("RGB", (64, 64)).save(inbox / "item.png")
    (inbox / "item.json").write_text('{"prompt": "p", "model": "tiny"}')
    assert load_inputs.fn(_ticket(inbox, "item.png", "item.json")).model == "tiny"


def test_a_portrait_phone_photo_reaches_the_renderer_upright(tmp_path: Path) -> None:
    """Phones store portrait shots sideways with an EXIF orientation; the video must not be sideways."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    encoded = io.BytesIO()
    _photo("RGB", (96, 64)).save(encoded, format="JPEG", quality=90, exif=exif.tobytes())
    (inbox / "item.jpg").write_bytes(encoded.getvalue())
    (inbox / "item.json").write_text('{"prompt": "p"}')

    job = load_inputs.fn(_ticket(inbox, "item.jpg", "item.json"))

    assert job.image_size == (64, 96) and job.height > job.width  # portrait, as the phone showed it
    assert job.image_file == encoded.getvalue()
    assert job.rgb_image().size == (64, 96)
    assert np.array_equal(np.asarray(job.rgb_image()), np.asarray(decode_image(encoded.getvalue(), "i", 10_000)))
