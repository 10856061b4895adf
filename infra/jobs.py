"""A job ticket: what the watcher hands to the generate-video flow.

Why a ticket and not the files: the flow may run on another host, so it receives where the
inputs live and which content it was promised (hashes), and re-reads them through the store.
The job id is a hash of that content, so the same drop always maps to the same job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULTS_NAME = "_defaults.json"
IGNORED_SUFFIXES = (".tmp", ".part", ".crdownload", ".swp")


class JobTicket(BaseModel):
    """One job, identified by content. Parameters of the generate-video deployment."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    stem: str  # relative key without extension: "shoes/red" -> outbox "shoes/red.mp4"
    inbox: str  # absolute folder path or s3://bucket/prefix
    outbox: str
    image_key: str | None  # None when a spec's "image" reference is missing or unsafe
    spec_key: str | None
    defaults_keys: tuple[str, ...] = ()
    image_sha256: str | None = None
    spec_sha256: str | None = None
    image_ref_error: str | None = None  # why the inputs were refused unread (unsafe reference, link or name)
    missing: Literal["spec", "image"] | None = None  # an orphan past I2VFLOW_ORPHAN_SECONDS: reported, not rendered

    @property
    def short_id(self) -> str:
        return self.job_id[:6]

    @property
    def run_name(self) -> str:
        """A flow-run name a person recognises: the input's name plus the job id."""
        return f"{PurePosixPath(self.stem).name}-{self.short_id}"

    def output_key(self, suffix: str) -> str:
        return f"{self.stem}{suffix}"


class RenderHandover(BaseModel):
    """A render the watcher handed to the GPU worker when it submitted the job (``early_render``).

    Why: a lone job's flow run takes ~1-1.5 s to be claimed, forked and started and to validate
    its inputs; the render need not wait for that. The flow awaits this task run instead of
    submitting its own, and only if its own validated job has the same ``job_digest``. The task
    run is not nested in the flow run: Prefect runs a flow run's task runs only while the flow
    run is Running, which is what the hand-over is there not to wait for.
    """

    model_config = ConfigDict(frozen=True)

    task_run_id: str
    job_digest: str


def make_job_id(route: str, stem: str, image_sha256: str | None, spec_sha256: str | None,
                defaults: list[tuple[str, str]]) -> str:
    """Content identity: same inbox and outbox (``route``), same name, same bytes, same defaults
    -> same job. The route matters: the same file dropped into two inboxes is two jobs."""
    payload = json.dumps([route, stem, image_sha256, spec_sha256, defaults], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def is_ignored(key: str) -> bool:
    """Hidden files and folders, temp and partial downloads never become jobs."""
    parts = PurePosixPath(key).parts
    return any(p.startswith(".") for p in parts) or key.lower().endswith(IGNORED_SUFFIXES)


def is_image(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES)


def stem_of(key: str) -> str:
    path = PurePosixPath(key)
    return str(path.with_suffix("")) if path.parent != PurePosixPath(".") else path.stem


def resolve_reference(spec_key: str, reference: str) -> str | None:
    """The inbox key a spec's ``"image"`` names (relative to the spec's folder), or None
    when it is absolute or climbs out of the inbox."""
    if reference.startswith(("/", "\\")) or "\\" in reference or "\0" in reference:
        return None
    parts: list[str] = list(PurePosixPath(spec_key).parent.parts)
    for part in PurePosixPath(reference).parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts) if parts else None


def defaults_chain(key: str) -> list[str]:
    """``_defaults.json`` keys that may apply to ``key``, outermost first."""
    parents = list(reversed(PurePosixPath(key).parents))
    return [str(p / DEFAULTS_NAME) if str(p) != "." else DEFAULTS_NAME for p in parents]
