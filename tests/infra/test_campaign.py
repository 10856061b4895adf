"""Campaign spec validation and planning: pure logic over a folder store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.campaign import (
    CampaignSpecError,
    apply_overrides,
    expand_variants,
    load_campaign_spec,
    plan_campaign,
    read_campaign_spec,
    survey,
)
from infra.spec import BadInputError, JobSpec
from infra.store import FolderStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/campaigns/spring-shoes.yaml"


def test_example_spec_is_valid() -> None:
    spec = read_campaign_spec(str(EXAMPLE))
    assert spec.name == "spring-shoes" and [n for n, _ in spec.variant_list()] == ["seed1", "seed2", "seed3"]
    assert spec.in_flight == 1 and spec.output_prefix("2026-03-02") == "campaigns/spring-shoes/2026-03-02/"


def test_every_problem_is_reported_with_its_field() -> None:
    raw = """
name: Spring Shoes
selection: {prefx: shoes/}
overrides: {num_frame: 24, steps: 500, prompt: "{prmpt}, spring"}
variants: [{name: a, guidance_scale: 99}, {name: a}]
output: out/
priority: urgent
timezone: Mars/Olympus
"""
    with pytest.raises(CampaignSpecError) as caught:
        load_campaign_spec(raw, "spring.yaml")
    fields = {p.field for p in caught.value.problems}
    assert {
        "name",
        "selection.prefx",
        "overrides.num_frame",
        "overrides.steps",
        "overrides.prompt",
        "variants[0].guidance_scale",
        "variants[1].name",
        "output",
        "priority",
        "timezone",
    } <= fields
    assert str(caught.value).startswith("spring.yaml: ")


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(CampaignSpecError, match="line 2 column 9"):
        load_campaign_spec("name: x\nsteps: a: b\n", "x.yaml")


def test_grid_variants_and_names() -> None:
    variants = expand_variants({"grid": {"seed": [1, 2], "guidance_scale": [7.5, 9]}})
    assert [n for n, _ in variants] == ["seed1_g7.5", "seed1_g9", "seed2_g7.5", "seed2_g9"]
    assert expand_variants([]) == [("base", {})]


def test_run_date_is_the_scheduled_day_in_the_campaign_zone() -> None:
    spec = load_campaign_spec("name: x\ntimezone: Europe/Berlin\n", "x")
    assert spec.run_date(datetime(2026, 3, 1, 23, 30, tzinfo=UTC)) == "2026-03-02"  # 00:30 in Berlin


def test_apply_overrides_prompt_template_and_size() -> None:
    spec = JobSpec(prompt="red shoe", resolution="512p", steps=20)
    out = apply_overrides(spec, {"prompt": "{prompt}, spring", "width": 64, "height": 64}, "c")
    assert (out.prompt, out.width, out.height, out.resolution, out.steps) == ("red shoe, spring", 64, 64, None, 20)
    with pytest.raises(BadInputError):
        apply_overrides(spec, {"num_frames": 99}, "c")


def _drop(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_survey_and_plan_selection_done_items_and_estimate(tmp_path: Path) -> None:
    inbox, outbox = FolderStore(tmp_path / "in"), FolderStore(tmp_path / "out")
    for stem in ("shoes/red", "shoes/blue", "shoes/green", "bags/tote"):
        _drop(inbox.root, f"{stem}.png", b"png")
        _drop(inbox.root, f"{stem}.json", json.dumps({"prompt": stem, "num_frames": 8, "steps": 10}).encode())
    _drop(outbox.root, "shoes/blue.error.json", b"{}")  # the last live run of blue failed
    sidecar = {
        "timings_seconds": {"render_on_model": 1.0},
        "frames": 8,
        "spec": {"steps": 10},
        "width": 64,
        "height": 64,
        "model": {"name": "tiny"},
    }
    _drop(outbox.root, "shoes/red.json", json.dumps(sidecar).encode())
    _drop(outbox.root, "campaigns/c/2026-03-02/shoes/red__seed1.json", b"{}")
    spec = load_campaign_spec("name: c\nselection: {prefix: shoes/}\nvariants: {grid: {seed: [1, 2]}}\n", "c")
    plan = plan_campaign(spec, survey(spec, inbox, outbox, "2026-03-02"), "2026-03-02")
    assert [(i.job.stem, i.variant, i.done) for i in plan.items] == [
        ("shoes/blue", "seed1", False),
        ("shoes/blue", "seed2", False),
        ("shoes/green", "seed1", False),
        ("shoes/green", "seed2", False),
        ("shoes/red", "seed1", True),
        ("shoes/red", "seed2", False),
    ]
    assert plan.items[0].video_key == "campaigns/c/2026-03-02/shoes/blue__seed1.mp4"
    assert plan.estimate_seconds == 5.0 and plan.measured_renders == 1  # 5 to do x 1 s each
    assert "1 already done, 5 to render" in plan.describe()

    failed = load_campaign_spec("name: c\nselection: {prefix: shoes/, only_failed: true}\n", "c")
    assert [i.job.stem for i in plan_campaign(failed, survey(failed, inbox, outbox, "d"), "d").items] == ["shoes/blue"]
    other = load_campaign_spec("name: c\nselection: {model_not: tiny, glob: 'shoes/*', limit: 1}\n", "c")
    assert [i.job.stem for i in plan_campaign(other, survey(other, inbox, outbox, "d"), "d").items] == ["shoes/blue"]
