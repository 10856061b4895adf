"""The job-spec schema: what a JSON dropped beside an image may say, and what went wrong.

Why a schema: users type these files by hand. Every field has a default or a clear bound,
unknown keys are errors (a typo like ``"num_frame"`` must not be silently ignored), and a
failure becomes an :class:`ErrorReport` that names the field and says how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

RESOLUTIONS: dict[str, int] = {"256p": 256, "512p": 512, "768p": 768}
MAX_PROMPT_CHARS = 2000
MAX_SIDE = 1280
MAX_JSON_DEPTH = 32


class JobSpec(BaseModel):
    """One job's settings after ``_defaults.json`` files and the job's own JSON are merged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_frames: int = Field(16, ge=8, le=32)
    fps: int = Field(8, ge=4, le=24)
    steps: int = Field(50, ge=10, le=100)
    guidance_scale: float = Field(9.0, ge=1.0, le=20.0)
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    resolution: Literal["256p", "512p", "768p"] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    model: str | None = Field(None, min_length=1, max_length=512)
    image: str | None = Field(None, min_length=1, max_length=1024)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and any(ord(c) < 32 and c not in "\t\n" for c in value):
            raise ValueError("contains control characters")
        return value

    @field_validator("num_frames", "fps", "steps", "guidance_scale", "width", "height", "seed", mode="before")
    @classmethod
    def _not_true_or_false(cls, value: object) -> object:
        # JSON's true would otherwise pass as 1: a typo'd value must not silently become a setting.
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value

    def check_size_fields(self) -> None:
        """Raise ValueError when the size is over- or under-specified."""
        if self.resolution and (self.width or self.height):
            raise ValueError("give either 'resolution' or 'width'/'height', not both")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both 'width' and 'height', or neither")

    def frame_size(self, image_width: int, image_height: int, default_short_side: int) -> tuple[int, int]:
        """(width, height) of the video: explicit, or the short side from ``resolution``
        (else the model's default) with the image's aspect ratio, multiples of 8."""
        if self.width and self.height:
            return self.width, self.height
        short = RESOLUTIONS[self.resolution] if self.resolution else default_short_side
        scale = short / min(image_width, image_height)
        width, height = image_width * scale, image_height * scale
        shrink = min(1.0, MAX_SIDE / max(width, height))
        return _round8(width * shrink), _round8(height * shrink)


def _round8(value: float) -> int:
    return max(64, int(round(value / 8)) * 8)


class FieldProblem(BaseModel):
    """One thing wrong with the input, phrased for the person who dropped it."""

    field: str | None
    problem: str
    fix: str


class ErrorReport(BaseModel):
    """The content of ``NAME.error.json``: what failed, where, and how to fix it."""

    error: str  # short category: invalid_json, invalid_spec, invalid_image, unsafe_path, ...
    message: str
    problems: list[FieldProblem] = []
    inputs: dict[str, str | None] = {}
    job_id: str | None = None
    flow_run_id: str | None = None
    i2vflow_version: str | None = None
    retry: str = "Fix the input and drop the file(s) again; a changed file makes a new job."


def error_file_bytes(report: ErrorReport) -> bytes:
    """The bytes of ``NAME.error.json``: the report and when it was written (one format for all writers)."""
    body = {**report.model_dump(), "written_at": datetime.now(UTC).isoformat()}
    return json.dumps(body, indent=2).encode()


class BadInputError(ValueError):
    """The job's input is wrong; retrying cannot help. Carries the report to publish."""

    def __init__(self, report: ErrorReport) -> None:
        super().__init__(report.message)
        self.report = report


def bad_input(error: str, field: str | None, problem: str, fix: str) -> BadInputError:
    """A refusal with one problem: the report's message is that problem."""
    return BadInputError(ErrorReport(error=error, message=problem,
                                     problems=[FieldProblem(field=field, problem=problem, fix=fix)]))


_FIXES: dict[str, str] = {
    "extra_forbidden": "remove it or correct its spelling; allowed keys: {allowed}",
    "missing": "add it; 'prompt' is a sentence describing the motion, e.g. "
    '"product rotating slowly under studio light"',
}


def _fix_for(error_type: str, message: str, field: str | None = None) -> str:
    template = _FIXES.get(error_type)
    if template:
        return template.format(allowed=", ".join(JobSpec.model_fields))
    accepted = accepted_values(field) if field else None
    if accepted:
        return f"use {accepted}"
    if error_type.endswith(("_type", "_parsing")):
        return f"use the right type: {message}"
    return f"change the value: {message}"


def accepted_values(field: str) -> str | None:
    """What a JobSpec field accepts, read from its declaration: 'a whole number from 4 to 24 (default 8)'."""
    info = JobSpec.model_fields.get(field)
    if info is None:
        return None
    kinds = [arg for arg in get_args(info.annotation) or (info.annotation,) if arg is not type(None)]
    limit = {name: getattr(m, name) for m in info.metadata
             for name in ("ge", "le", "multiple_of", "min_length", "max_length") if hasattr(m, name)}
    if kinds and get_origin(kinds[0]) is Literal:
        text = "one of " + ", ".join(json.dumps(v) for v in get_args(kinds[0]))
    elif kinds and kinds[0] in (int, float):
        kind = "a whole number" if kinds[0] is int else "a number"
        text = f"{kind} from {_number(limit['ge'])} to {_number(limit['le'])}"
        text += f", a multiple of {limit['multiple_of']}" if "multiple_of" in limit else ""
    else:
        text = f"text of {limit.get('min_length', 0)} to {limit['max_length']} characters"
    return text + (f" (default {_number(info.default)})" if isinstance(info.default, int | float) else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def problems_from_validation(error: ValidationError, source: str) -> list[FieldProblem]:
    """Turn pydantic's errors into one FieldProblem per field, naming the file."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or None
        problems.append(
            FieldProblem(
                field=field,
                problem=f"{source}: {item['msg']} (got {_short(item.get('input'))})",
                fix=_fix_for(item["type"], item["msg"], field),
            )
        )
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_json_object(raw: bytes, source: str) -> dict[str, Any]:
    """Parse a spec or defaults file into a dict, or raise BadInputError saying why."""

    def bad(message: str, fix: str) -> BadInputError:
        return bad_input("invalid_json", None, f"{source}: {message}", fix)

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8") from None
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise bad(f"nested deeper than {MAX_JSON_DEPTH} levels", "a job spec is a flat JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "fix the JSON syntax (quotes around keys and strings, commas between fields, "
            "no trailing comma)",
        ) from None
    if not isinstance(data, dict):
        raise bad(f"expected a JSON object {{...}}, got {type(data).__name__}",
                  'write an object such as {"prompt": "camera slowly zooming in"}')
    return data


def _nesting_depth(text: str) -> int:
    """Bracket depth outside strings: checked before json.loads, which recurses."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def resolve_spec(layers: Sequence[tuple[str, bytes]]) -> JobSpec:
    """Merge JSON layers (outermost ``_defaults.json`` first, the job's own JSON last)
    into a validated JobSpec, or raise BadInputError naming the file and field."""
    merged: dict[str, Any] = {}
    problems: list[FieldProblem] = []
    for source, raw in layers:
        data = parse_json_object(raw, source)
        unknown = sorted(set(data) - set(JobSpec.model_fields))
        problems += [
            FieldProblem(field=key, problem=f"{source}: unknown key {key!r}",
                         fix=_fix_for("extra_forbidden", ""))
            for key in unknown
        ]
        merged.update({k: v for k, v in data.items() if k in JobSpec.model_fields})
    if problems:
        raise BadInputError(ErrorReport(error="invalid_spec", message=problems[0].problem, problems=problems))
    return validate_merged(merged, layers[-1][0] if layers else "spec")


def validate_merged(merged: dict[str, Any], source: str,
                    size_fix: str = 'e.g. "resolution": "512p" or "width": 768, "height": 512') -> JobSpec:
    """Validate merged spec fields, or raise BadInputError naming ``source`` and the field."""
    try:
        spec = JobSpec.model_validate(merged)
        spec.check_size_fields()
    except ValidationError as exc:
        problems = problems_from_validation(exc, source)
        raise BadInputError(
            ErrorReport(error="invalid_spec", message=problems[0].problem, problems=problems)
        ) from None
    except ValueError as exc:
        raise bad_input("invalid_spec", "width/height/resolution", f"{source}: {exc}", size_fix) from None
    return spec


def derive_seed(image_sha256: str, spec: JobSpec) -> int:
    """A seed from the content, so re-running the same job reproduces the same video."""
    digest = hashlib.sha256(f"{image_sha256}\0{spec.prompt}".encode()).hexdigest()
    return int(digest[:8], 16)
