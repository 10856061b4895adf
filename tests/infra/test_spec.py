"""The job-spec schema: defaults, bounds, merging, and error reports a person can act on."""

from __future__ import annotations

import json

import pytest

from infra.spec import BadInputError, JobSpec, derive_seed, parse_json_object, resolve_spec


def _resolve(*layers: dict | bytes) -> JobSpec:
    return resolve_spec([(f"layer{i}.json", raw if isinstance(raw, bytes) else json.dumps(raw).encode())
                         for i, raw in enumerate(layers)])


def _error(*layers: dict | bytes) -> BadInputError:
    with pytest.raises(BadInputError) as info:
        _resolve(*layers)
    return info.value


def test_defaults_match_the_contract() -> None:
    spec = _resolve({"prompt": "camera slowly zooming in"})
    assert (spec.num_frames, spec.fps, spec.steps, spec.guidance_scale) == (16, 8, 50, 9.0)
    assert spec.seed is None and spec.model is None


def test_later_layers_override_defaults() -> None:
    spec = _resolve({"prompt": "from defaults", "steps": 20, "fps": 12}, {"prompt": "own", "steps": 30})
    assert (spec.prompt, spec.steps, spec.fps) == ("own", 30, 12)


@pytest.mark.parametrize(("payload", "field", "words"), [
    ({"prompt": "p", "num_frames": 40}, "num_frames", "less than or equal to 32"),
    ({"prompt": "p", "num_frames": 4}, "num_frames", "greater than or equal to 8"),
    ({"prompt": "p", "fps": 30}, "fps", "24"),
    ({"prompt": "p", "steps": 5}, "steps", "10"),
    ({"prompt": "p", "guidance_scale": 25}, "guidance_scale", "20"),
    ({"prompt": "p", "num_frames": "many"}, "num_frames", "integer"),
    ({"prompt": "p", "resolution": "4k"}, "resolution", "512p"),
    ({"prompt": "p", "width": 100, "height": 64}, "width", "multiple of 8"),
    ({"prompt": "p", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "p", "seed": True}, "seed", "expected a number, got true"),
    ({"prompt": "p", "num_frames": False}, "num_frames", "expected a number, got false"),
    ({"prompt": ""}, "prompt", "at least 1"),
    ({"prompt": "x" * 100_000}, "prompt", "at most 2000"),
    ({"prompt": "bell\x07"}, "prompt", "control characters"),
    ({}, "prompt", "required"),
])
def test_each_bad_field_is_named_with_a_fix(payload: dict, field: str, words: str) -> None:
    report = _error(payload).report
    assert report.error == "invalid_spec"
    assert report.problems[0].field == field
    assert words in report.problems[0].problem
    assert report.problems[0].fix


@pytest.mark.parametrize(("payload", "fix"), [
    ({"prompt": "p", "fps": 60}, "use a whole number from 4 to 24 (default 8)"),
    ({"prompt": "p", "num_frames": "lots"}, "use a whole number from 8 to 32 (default 16)"),
    ({"prompt": "p", "guidance_scale": 0.5}, "use a number from 1 to 20 (default 9)"),
    ({"prompt": "p", "resolution": "4k"}, 'use one of "256p", "512p", "768p"'),
    ({"prompt": "p", "width": 513, "height": 512}, "use a whole number from 64 to 1280, a multiple of 8"),
    ({"prompt": "p", "seed": -1}, "use a whole number from 0 to 4294967295"),
    ({"prompt": ""}, "use text of 1 to 2000 characters"),
])
def test_the_fix_says_what_the_field_accepts(payload: dict, fix: str) -> None:
    """Not pydantic's complaint again: the range, the step and the default, read from the schema."""
    assert _error(payload).report.problems[0].fix == fix


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    prompt = 'say \\"' + "[" * 40  # as written in the JSON: an escaped quote, then brackets, inside the string
    data = parse_json_object(('{"prompt": "' + prompt + '"}').encode(), "x.json")
    assert data["prompt"] == 'say "' + "[" * 40


def test_unknown_keys_are_errors_listing_the_allowed_ones() -> None:
    report = _error({"prompt": "p", "num_frame": 8, "colour": "red"}).report
    assert [p.field for p in report.problems] == ["colour", "num_frame"]
    assert "num_frames" in report.problems[0].fix


def test_size_is_either_resolution_or_width_and_height() -> None:
    assert "not both" in _error({"prompt": "p", "resolution": "512p", "width": 512, "height": 512}).report.message
    assert "both" in _error({"prompt": "p", "width": 512}).report.message


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"prompt": "p",}', "invalid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b"[" * 10_000 + b"]" * 10_000, "nested deeper"),
])
def test_unparseable_files_are_reported_not_crashed(raw: bytes, words: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_json_object(raw, "x.json")
    assert words in info.value.report.message and info.value.report.error == "invalid_json"


def test_frame_size_keeps_aspect_and_rounds_to_8() -> None:
    spec = _resolve({"prompt": "p", "resolution": "512p"})
    assert spec.frame_size(1920, 1080, 64) == (912, 512)
    assert _resolve({"prompt": "p"}).frame_size(96, 128, 64) == (64, 88)
    assert _resolve({"prompt": "p", "width": 320, "height": 192}).frame_size(10, 10, 64) == (320, 192)
    assert max(_resolve({"prompt": "p", "resolution": "768p"}).frame_size(4000, 500, 64)) <= 1280


def test_seed_is_derived_from_content_and_stable() -> None:
    spec = _resolve({"prompt": "p"})
    assert derive_seed("ab" * 32, spec) == derive_seed("ab" * 32, spec)
    assert derive_seed("ab" * 32, spec) != derive_seed("cd" * 32, spec)
