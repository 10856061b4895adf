"""Campaigns: re-render a selection of the inbox with overrides and variants, into a dated slot.

Why a module of pure logic: a campaign is a small YAML/JSON file written by a person, so it is
validated up front with one precise problem per field (nothing renders from a bad spec), and the
plan (which (input, variant) items, where their outputs go, what is already done, how much GPU
time it costs) is computed from listings alone. ``i2vflow campaign plan`` and the campaign flow
compute the very same plan; only the flow renders.

    name: spring-shoes
    selection: {prefix: shoes/, limit: 50}
    overrides: {num_frames: 24, prompt: "{prompt}, soft spring light"}
    variants: {grid: {seed: [1, 2, 3]}}
    output: campaigns/{name}/{date}/     # the default
    priority: low                        # at most 1 campaign render queued at the GPU
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import product
from pathlib import PurePosixPath
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from infra.jobs import JobTicket, defaults_chain, is_ignored, resolve_reference
from infra.spec import (
    BadInputError,
    FieldProblem,
    JobSpec,
    parse_json_object,
    problems_from_validation,
    validate_merged,
)
from infra.store.base import ObjectInfo, Store
from infra.watch.scanner import pair

# Job-spec fields a campaign may override ("image" names the input, so it is not one of them).
OVERRIDABLE = tuple(f for f in JobSpec.model_fields if f != "image")
# Renders a campaign keeps queued at the GPU worker at once: live drops queue behind at most this.
PRIORITY_IN_FLIGHT = {"low": 1, "normal": 2, "high": 4}
DEFAULT_OUTPUT = "campaigns/{name}/{date}/"
CONTACT_SHEET = "contact-sheet.png"
REPORT = "campaign.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,62}$")


class CampaignSpecError(ValueError):
    """The campaign file is wrong; carries one FieldProblem per mistake."""

    def __init__(self, source: str, problems: list[FieldProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the campaign spec"]
        lines += [f"  - {p.field or '(file)'}: {p.problem}\n    fix: {p.fix}" for p in problems]
        super().__init__("\n".join(lines))


class Selection(BaseModel):
    """Which inbox jobs the campaign takes (all conditions must hold)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field("", max_length=1024, description="Inbox key prefix, e.g. 'shoes/'.")
    glob: str | None = Field(None, max_length=1024, description="fnmatch over the image key: 'shoes/*red*'.")
    only_failed: bool = Field(False, description="Only jobs whose last live run left NAME.error.json.")
    model_not: str | None = Field(
        None,
        min_length=1,
        description="Only jobs whose last video came from another model (or that have no video yet).",
    )
    newer_than: date | datetime | None = Field(None, description="Only jobs with an input modified after.")
    limit: int | None = Field(None, ge=1, le=100_000, description="At most this many jobs (sorted by key).")

    @field_validator("prefix")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in PurePosixPath(value).parts or "\\" in value:
            raise ValueError(
                "must be a relative inbox prefix such as 'shoes/' (no '/' at the start, no '..')"
            )
        return value


class CampaignSpec(BaseModel):
    """One campaign: what to re-render, how, and where the outputs go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str | None = Field(None, max_length=2000)
    selection: Selection = Selection()
    overrides: dict[str, Any] = {}
    variants: list[dict[str, Any]] | dict[str, Any] = []
    output: str = DEFAULT_OUTPUT
    priority: Literal["low", "normal", "high"] = "low"
    max_in_flight: int | None = Field(None, ge=1, le=64, description="Overrides what priority implies.")
    timezone: str = "UTC"

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be a lowercase slug: letters, digits, '-' or '_', at most 63 characters")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/Berlin'"
            ) from None
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        fields = _placeholders(value)
        unknown = fields - {"name", "date"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {{name}}, {{date}}")
        if "date" not in fields:
            raise ValueError("must contain {date}, so each scheduled run renders into its own slot")
        probe = value.format(name="n", date="2000-01-01")
        if probe.startswith("/") or ".." in PurePosixPath(probe).parts or "\\" in probe:
            raise ValueError("must be a relative outbox prefix (no '/' at the start, no '..')")
        return value if value.endswith("/") else value + "/"

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = _check_overrides(value, "overrides")
        if problems:
            raise _Problems(problems)
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: Any, info: ValidationInfo) -> Any:
        base = info.data.get("overrides") or {}
        problems: list[FieldProblem] = []
        names: set[str] = set()
        for index, (name, values) in enumerate(expand_variants(value)):
            where = f"variants[{index}]" if isinstance(value, list) else f"variants.grid ({name})"
            if not _VARIANT.match(name):
                problems.append(
                    FieldProblem(
                        field=f"{where}.name",
                        problem=f"variant name {name!r} is not usable in a file name",
                        fix="letters, digits, '-', '_', '.', '='",
                    )
                )
            if name in names:
                problems.append(
                    FieldProblem(
                        field=f"{where}.name",
                        problem=f"duplicate variant name {name!r}",
                        fix="give each variant its own 'name'",
                    )
                )
            names.add(name)
            problems += _check_overrides({**base, **values}, where, only=set(values))
        if problems:
            raise _Problems(problems)
        return value

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or PRIORITY_IN_FLIGHT[self.priority]

    def variant_list(self) -> list[tuple[str, dict[str, Any]]]:
        """(variant name, overrides of the campaign merged with the variant's own)."""
        return [(name, {**self.overrides, **values}) for name, values in expand_variants(self.variants)]

    def output_prefix(self, run_date: str) -> str:
        return self.output.format(name=self.name, date=run_date)

    def run_date(self, when: datetime | None = None) -> str:
        """The slot's date in the campaign's time zone (a cron run at 02:00 Berlin is that day)."""
        when = when or datetime.now(UTC)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(ZoneInfo(self.timezone)).date().isoformat()


class _Problems(ValueError):
    """Carries FieldProblems out of a validator (pydantic wraps ValueErrors)."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.problem}" for p in problems))
        self.problems = problems


def _placeholders(template: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"bad braces in {template!r}: {exc}") from None


def _check_overrides(values: dict[str, Any], where: str, only: set[str] | None = None) -> list[FieldProblem]:
    """Each override is a job-spec field with a valid value; a prompt may use ``{prompt}``."""
    problems: list[FieldProblem] = []
    for key in sorted(set(values) - set(OVERRIDABLE)):
        if key == "name" and where.startswith("variants"):
            continue
        problems.append(
            FieldProblem(
                field=f"{where}.{key}",
                problem=f"unknown job-spec field {key!r}",
                fix=f"use one of: {', '.join(OVERRIDABLE)}",
            )
        )
    probe = {k: v for k, v in values.items() if k in OVERRIDABLE}
    for key in ("prompt", "negative_prompt"):
        if isinstance(probe.get(key), str):
            try:
                bad = _placeholders(probe[key]) - {"prompt"}
            except ValueError as exc:
                bad, probe[key] = set(), None
                problems.append(
                    FieldProblem(
                        field=f"{where}.{key}",
                        problem=str(exc),
                        fix="write {prompt} for the original prompt; double other braces",
                    )
                )
            if bad:
                problems.append(
                    FieldProblem(
                        field=f"{where}.{key}",
                        problem=f"unknown placeholder(s) {sorted(bad)}",
                        fix="only {prompt} (the job's own prompt) may be used",
                    )
                )
            if probe.get(key) is not None:
                probe[key] = _fill(probe[key], "a sample prompt")
    try:
        JobSpec.model_validate({"prompt": "a sample prompt", **probe})
    except ValidationError as exc:
        for item in problems_from_validation(exc, where):
            if only is None or (item.field or "").split(".")[0] in only:
                problems.append(item.model_copy(update={"field": f"{where}.{item.field}"}))
    if probe.get("resolution") and (probe.get("width") or probe.get("height")):
        problems.append(
            FieldProblem(
                field=f"{where}.resolution",
                problem="both 'resolution' and width/height",
                fix="give one of them",
            )
        )
    if ("width" in probe) != ("height" in probe):
        problems.append(
            FieldProblem(
                field=f"{where}.width/height",
                problem="only one of width and height",
                fix="override both, e.g. width: 64, height: 64",
            )
        )
    return problems


def _fill(template: str, original: str) -> str:
    return (
        template.replace("{{", "\0")
        .replace("}}", "\1")
        .replace("{prompt}", original)
        .replace("\0", "{")
        .replace("\1", "}")
    )


def expand_variants(variants: list[dict[str, Any]] | dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[{name: a, seed: 1}, ...]`` or ``{grid: {seed: [1, 2], guidance_scale: [7, 9]}}`` ->
    [(name, overrides)]. No variants means one, named ``base``."""
    if isinstance(variants, dict):
        if set(variants) != {"grid"} or not isinstance(variants["grid"], dict) or not variants["grid"]:
            raise ValueError("variants must be a list of overrides or {grid: {field: [values, ...]}}")
        grid = variants["grid"]
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"variants.grid.{key} must be a non-empty list of values")
        keys = list(grid)
        combos = list(product(*(grid[k] for k in keys)))
        if len(combos) > 256:
            raise ValueError(f"variants.grid makes {len(combos)} variants; at most 256")
        return [
            (
                "_".join(f"{_short_field(k)}{_token(v)}" for k, v in zip(keys, combo, strict=True)),
                dict(zip(keys, combo, strict=True)),
            )
            for combo in combos
        ]
    if not variants:
        return [("base", {})]
    out: list[tuple[str, dict[str, Any]]] = []
    for index, variant in enumerate(variants):
        if not isinstance(variant, dict):
            raise ValueError(f"variants[{index}] must be a mapping of job-spec overrides")
        values = {k: v for k, v in variant.items() if k != "name"}
        name = (
            variant.get("name")
            or "_".join(f"{_short_field(k)}{_token(v)}" for k, v in values.items())
            or f"v{index + 1}"
        )
        out.append((str(name), values))
    return out


def _short_field(key: str) -> str:
    return {"guidance_scale": "g", "num_frames": "f", "steps": "steps", "seed": "seed"}.get(key, key)


def _token(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", str(value)).strip("-")[:24] or "x"


def load_campaign_spec(raw: bytes | str, source: str) -> CampaignSpec:
    """Parse YAML or JSON and validate; raise CampaignSpecError listing every problem."""
    import yaml

    text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise CampaignSpecError(
            source,
            [
                FieldProblem(
                    field=None,
                    problem=f"not valid YAML/JSON{where}: {getattr(exc, 'problem', exc)}",
                    fix="check indentation and quoting; quote prompts that contain ': ' or '{'",
                )
            ],
        ) from None
    if not isinstance(data, dict):
        raise CampaignSpecError(
            source,
            [
                FieldProblem(
                    field=None,
                    problem=f"expected a mapping, got {type(data).__name__}",
                    fix="start with 'name: my-campaign'",
                )
            ],
        )
    try:
        return CampaignSpec.model_validate(data)
    except ValidationError as exc:
        problems: list[FieldProblem] = []
        for item in exc.errors():
            inner = (item.get("ctx") or {}).get("error")
            if isinstance(inner, _Problems):
                problems += inner.problems
                continue
            loc = ".".join(str(p) for p in item["loc"]) or None
            message = item["msg"].removeprefix("Value error, ")
            fix = (
                "remove it or correct its spelling"
                if item["type"] == "extra_forbidden"
                else f"change the value (got {json.dumps(item.get('input'), default=str)[:80]})"
            )
            problems.append(FieldProblem(field=loc, problem=message, fix=fix))
        raise CampaignSpecError(source, problems) from None


def read_campaign_spec(path: str, store_opener: Callable[[str], Store] | None = None) -> CampaignSpec:
    """A spec from a local file, or from a store (``s3://bucket/prefix/spring.yaml``)."""
    if path.startswith("s3://"):
        if store_opener is None:
            raise ValueError("reading a campaign from a bucket needs a store opener")
        location, _, key = path.rpartition("/")
        return load_campaign_spec(store_opener(location).read(key), path)
    from pathlib import Path

    return load_campaign_spec(Path(path).read_bytes(), path)


# -- overrides applied to one job ---------------------------------------------------------------


def apply_overrides(spec: JobSpec, overrides: dict[str, Any], source: str) -> JobSpec:
    """The job's spec with the campaign's overrides; ``{prompt}`` in a prompt is the original.
    Overriding width/height drops the job's resolution and vice versa. BadInputError if invalid."""
    if not overrides:
        return spec
    merged = {k: v for k, v in spec.model_dump().items() if v is not None}
    values = dict(overrides)
    for key in ("prompt", "negative_prompt"):
        if isinstance(values.get(key), str):
            values[key] = _fill(values[key], merged.get(key) or "")
    if "width" in values or "height" in values:
        merged.pop("resolution", None)
    if "resolution" in values:
        merged.pop("width", None)
        merged.pop("height", None)
    merged.update(values)
    return validate_merged(merged, source, size_fix="fix the campaign")


# -- survey (reads the stores) and plan (pure) ------------------------------------------------------


@dataclass(frozen=True)
class InboxJob:
    """One job of the inbox as a campaign sees it."""

    stem: str
    image_key: str
    spec_key: str | None
    defaults_keys: tuple[str, ...]
    spec_peek: dict[str, Any] = field(default_factory=dict, compare=False)
    modified: datetime | None = None
    last_status: Literal["none", "done", "failed"] = "none"
    last_model: str | None = None


@dataclass
class Survey:
    """What the stores hold: inbox jobs under the selection prefix, measured render costs, and
    which outputs of this slot already exist."""

    jobs: list[InboxJob]
    unit_costs: list[float]  # render seconds per (frame * step * pixel) from earlier sidecars
    existing: set[str]  # outbox keys under the slot prefix


@dataclass(frozen=True)
class PlanItem:
    job: InboxJob
    variant: str
    overrides: dict[str, Any] = field(compare=False)
    output_stem: str = ""
    done: bool = False
    estimate_seconds: float | None = None

    @property
    def video_key(self) -> str:
        return f"{self.output_stem}.mp4"

    @property
    def sidecar_key(self) -> str:
        return f"{self.output_stem}.json"

    @property
    def error_key(self) -> str:
        return f"{self.output_stem}.error.json"


@dataclass
class Plan:
    campaign: CampaignSpec
    run_date: str
    prefix: str
    items: list[PlanItem]
    measured_renders: int

    @property
    def todo(self) -> list[PlanItem]:
        return [item for item in self.items if not item.done]

    @property
    def estimate_seconds(self) -> float | None:
        values = [item.estimate_seconds for item in self.todo]
        return None if any(v is None for v in values) else round(sum(v for v in values if v), 1)

    def describe(self) -> str:
        """A human summary, as `i2vflow campaign plan` prints it."""
        spec = self.campaign
        jobs = len({item.job.stem for item in self.items})
        lines = [
            f"campaign {spec.name}  slot {self.run_date}  -> {self.prefix}",
            f"{jobs} job(s) x {len(spec.variant_list())} variant(s) = {len(self.items)} item(s); "
            f"{len(self.items) - len(self.todo)} already done, {len(self.todo)} to render; "
            f"at most {spec.in_flight} queued at the GPU (priority {spec.priority})",
        ]
        estimate = self.estimate_seconds
        lines.append(
            f"estimated GPU time: {_duration(estimate)} (from {self.measured_renders} measured render(s))"
            if estimate is not None
            else "estimated GPU time: unknown (no measured renders in the outbox yet; run one job first)"
        )
        lines.append("")
        for item in self.items:
            est = "" if item.estimate_seconds is None else f"  ~{item.estimate_seconds:.1f}s"
            lines.append(
                f"  {'done' if item.done else 'todo'}  {item.job.image_key}  [{item.variant}]  "
                f"-> {item.video_key}{est}"
            )
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign.name,
            "run_date": self.run_date,
            "prefix": self.prefix,
            "estimate_seconds": self.estimate_seconds,
            "measured_renders": self.measured_renders,
            "items": [
                {
                    "input": i.job.image_key,
                    "variant": i.variant,
                    "overrides": i.overrides,
                    "output": i.video_key,
                    "done": i.done,
                    "estimate_seconds": i.estimate_seconds,
                }
                for i in self.items
            ],
        }


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def survey(
    spec: CampaignSpec,
    inbox: Store,
    outbox: Store,
    run_date: str,
    modified_at: Callable[[str], datetime | None] | None = None,
) -> Survey:
    """List the inbox under the selection's prefix and the outbox beside it; no rendering."""
    listing = [info for info in inbox.list(spec.selection.prefix) if not is_ignored(info.key)]
    # _defaults.json files above the prefix apply too.
    listed = {info.key for info in listing}
    for key in defaults_chain(f"{spec.selection.prefix}x"):
        if key not in listed and (info := inbox.stat(key)) is not None:
            listing.append(info)
    settled = {info.key: info for info in listing}
    candidates = pair(settled, set(), dict.fromkeys(settled, float("inf")), 0.0)
    jobs: list[InboxJob] = []
    for candidate in candidates:
        peek = _peek(inbox.read(candidate.spec_key)) if candidate.spec_key else {}
        image_key = candidate.image_key
        if image_key is None:
            reference = peek.get("image")
            if not isinstance(reference, str):
                continue
            image_key = resolve_reference(candidate.spec_key or "", reference)
            if image_key is None or inbox.stat(image_key) is None:
                continue
        status, model = _last_result(outbox, candidate.stem)
        modified = None
        if spec.selection.newer_than is not None and modified_at is not None:
            stamps = [m for k in (image_key, candidate.spec_key) if k and (m := modified_at(k))]
            modified = max(stamps) if stamps else None
        jobs.append(
            InboxJob(
                candidate.stem,
                image_key,
                candidate.spec_key,
                candidate.defaults_keys,
                peek,
                modified,
                status,
                model,
            )
        )
    prefix = spec.output_prefix(run_date)
    existing = {info.key for info in outbox.list(prefix)}
    return Survey(jobs=jobs, unit_costs=_unit_costs(outbox), existing=existing)


def _peek(raw: bytes) -> dict[str, Any]:
    try:
        return parse_json_object(raw, "spec")
    except BadInputError:
        return {}


def _last_result(outbox: Store, stem: str) -> tuple[Literal["none", "done", "failed"], str | None]:
    """What the last live run of ``stem`` left in the outbox."""
    if outbox.stat(f"{stem}.error.json") is not None:
        return "failed", None
    if outbox.stat(f"{stem}.json") is None:
        return "none", None
    try:
        sidecar = json.loads(outbox.read(f"{stem}.json"))
        return "done", (sidecar.get("model") or {}).get("name") or (sidecar.get("spec") or {}).get("model")
    except (ValueError, OSError):
        return "done", None


def _unit_costs(outbox: Store, limit: int = 50) -> list[float]:
    """Seconds per frame*step*pixel of up to ``limit`` recent renders (live and campaign sidecars)."""
    costs: list[float] = []
    sidecars = [
        i
        for i in outbox.list()
        if i.key.endswith(".json")
        and not i.key.endswith(".error.json")
        and PurePosixPath(i.key).name != REPORT
    ]
    for info in sorted(sidecars, key=lambda i: i.version, reverse=True)[:limit]:
        try:
            data = json.loads(outbox.read(info.key))
            seconds = float(data["timings_seconds"]["render_on_model"])
            work = int(data["frames"]) * int(data["spec"]["steps"]) * int(data["width"]) * int(data["height"])
        except (ValueError, KeyError, TypeError, OSError):
            continue
        if work > 0 and seconds > 0:
            costs.append(seconds / work)
    return costs


def plan_campaign(spec: CampaignSpec, found: Survey, run_date: str, default_model: str = "tiny") -> Plan:
    """Select jobs, cross them with variants, mark what the slot already holds, estimate."""
    sel = spec.selection
    jobs = [
        job for job in sorted(found.jobs, key=lambda j: j.image_key) if _selected(sel, job, default_model)
    ]
    if sel.limit is not None:
        jobs = jobs[: sel.limit]
    prefix = spec.output_prefix(run_date)
    unit = sorted(found.unit_costs)[len(found.unit_costs) // 2] if found.unit_costs else None
    items = []
    for job in jobs:
        for name, overrides in spec.variant_list():
            output_stem = f"{prefix}{job.stem}__{name}"
            done = f"{output_stem}.json" in found.existing
            items.append(
                PlanItem(
                    job,
                    name,
                    overrides,
                    output_stem,
                    done,
                    _estimate(unit, job.spec_peek, overrides, default_model),
                )
            )
    return Plan(spec, run_date, prefix, items, len(found.unit_costs))


def _selected(sel: Selection, job: InboxJob, default_model: str) -> bool:
    if sel.glob and not fnmatch.fnmatchcase(job.image_key, sel.glob):
        return False
    if sel.only_failed and job.last_status != "failed":
        return False
    if (
        sel.model_not is not None
        and job.last_status == "done"
        and (job.last_model or default_model) == sel.model_not
    ):
        return False
    if sel.newer_than is not None:
        bound = (
            sel.newer_than
            if isinstance(sel.newer_than, datetime)
            else datetime.combine(sel.newer_than, datetime.min.time())
        )
        bound = bound if bound.tzinfo else bound.replace(tzinfo=UTC)
        if job.modified is None or job.modified <= bound:
            return False
    return True


def _estimate(
    unit: float | None, peek: dict[str, Any], overrides: dict[str, Any], default_model: str
) -> float | None:
    if unit is None:
        return None
    values = {**peek, **overrides}
    defaults = JobSpec.model_fields
    frames = _int(values.get("num_frames"), defaults["num_frames"].default)
    steps = _int(values.get("steps"), defaults["steps"].default)
    model = values.get("model") or default_model
    if values.get("width") and values.get("height"):
        pixels = _int(values["width"], 512) * _int(values["height"], 512)
    else:
        short = {"256p": 256, "512p": 512, "768p": 768}.get(
            values.get("resolution") or "", 64 if model == "tiny" else 512
        )
        pixels = short * short
    return round(unit * frames * steps * pixels, 2)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def item_ticket(
    item: PlanItem,
    campaign: str,
    run_date: str,
    inbox: Store,
    inbox_location: str,
    outbox_location: str,
    hashes: dict[str, str] | None = None,
) -> JobTicket:
    """A ticket for one campaign item: the job's inputs, published under the slot's stem."""
    hashes = hashes if hashes is not None else {}

    def sha(key: str) -> str:
        if key not in hashes:
            digest = hashlib.sha256()
            with inbox.open(key) as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
            hashes[key] = digest.hexdigest()
        return hashes[key]

    job = item.job
    image_sha = sha(job.image_key)
    spec_sha = sha(job.spec_key) if job.spec_key else None
    payload = json.dumps(
        [
            campaign,
            run_date,
            item.output_stem,
            image_sha,
            spec_sha,
            [(k, sha(k)) for k in job.defaults_keys],
            item.overrides,
        ],
        separators=(",", ":"),
        sort_keys=True,
        default=str,
    )
    return JobTicket(
        job_id=hashlib.sha256(payload.encode()).hexdigest()[:24],
        stem=item.output_stem,
        inbox=inbox_location,
        outbox=outbox_location,
        image_key=job.image_key,
        spec_key=job.spec_key,
        defaults_keys=job.defaults_keys,
        image_sha256=image_sha,
        spec_sha256=spec_sha,
    )


def store_modified_at(store: Store) -> Callable[[str], datetime | None]:
    """When an input was last modified: file mtime for a folder, LastModified for a bucket."""

    def modified(key: str) -> datetime | None:
        root = getattr(store, "root", None)
        if root is not None:
            try:
                return datetime.fromtimestamp(root.joinpath(*key.split("/")).stat().st_mtime, UTC)
            except OSError:
                return None
        client, bucket = getattr(store, "client", None), getattr(store, "bucket", None)
        if client is None:
            return None
        try:
            stamp = client.stat_object(bucket, getattr(store, "prefix", "") + key).last_modified
        except Exception:
            return None
        return stamp if stamp is None or stamp.tzinfo else stamp.replace(tzinfo=UTC)

    return modified


def slot_items(items: Iterable[PlanItem]) -> dict[str, int]:
    """Counts for reports."""
    items = list(items)
    return {"items": len(items), "done": sum(i.done for i in items), "todo": sum(not i.done for i in items)}


__all__ = [
    "CampaignSpec",
    "CampaignSpecError",
    "InboxJob",
    "ObjectInfo",
    "Plan",
    "PlanItem",
    "Selection",
    "Survey",
    "apply_overrides",
    "item_ticket",
    "load_campaign_spec",
    "plan_campaign",
    "read_campaign_spec",
    "store_modified_at",
    "survey",
]
