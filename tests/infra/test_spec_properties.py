"""Property-based tests of the job-spec schema: whatever a person drops, the answer is a valid
spec or a BadInputError with a report, never another exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from infra.spec import BadInputError, JobSpec, resolve_spec

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
valid_specs = st.fixed_dictionaries(
    {"prompt": st.text(alphabet=st.characters(min_codepoint=32, blacklist_categories=("Cs",)), min_size=1,
                       max_size=200)},
    optional={
        "num_frames": st.integers(8, 32), "fps": st.integers(4, 24), "steps": st.integers(10, 100),
        "guidance_scale": st.floats(1.0, 20.0), "seed": st.integers(0, 2**32 - 1),
        "resolution": st.sampled_from(["256p", "512p", "768p"]),
    },
)


@given(valid_specs)
@settings(max_examples=200, deadline=None)
def test_every_spec_within_bounds_is_accepted_unchanged(data: dict) -> None:
    spec = resolve_spec([("job.json", json.dumps(data).encode())])
    assert {k: getattr(spec, k) for k in data} == data


@given(st.dictionaries(st.sampled_from(list(JobSpec.model_fields) + ["typo", "prompts"]), json_values, max_size=8))
@settings(max_examples=300, deadline=None)
def test_any_json_object_gives_a_spec_or_a_report(data: dict) -> None:
    try:
        resolve_spec([("job.json", json.dumps(data).encode())])
    except BadInputError as exc:
        assert exc.report.problems and all(p.fix for p in exc.report.problems)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_a_spec_or_a_report(raw: bytes) -> None:
    try:
        resolve_spec([("job.json", raw)])
    except BadInputError as exc:
        assert exc.report.error in {"invalid_json", "invalid_spec"}


@given(st.sampled_from(["num_frames", "fps", "steps"]), st.integers(-10**6, 10**6))
@settings(max_examples=300, deadline=None)
def test_out_of_range_integers_name_their_field(field: str, value: int) -> None:
    low, high = {"num_frames": (8, 32), "fps": (4, 24), "steps": (10, 100)}[field]
    raw = json.dumps({"prompt": "p", field: value}).encode()
    if low <= value <= high:
        assert getattr(resolve_spec([("j.json", raw)]), field) == value
    else:
        try:
            resolve_spec([("j.json", raw)])
        except BadInputError as exc:
            assert exc.report.problems[0].field == field
        else:
            raise AssertionError(f"{field}={value} was accepted")
