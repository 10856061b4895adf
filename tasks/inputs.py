"""Task: read the job's files from the inbox and turn them into a validated job.

Why a task of its own: bad input is the common failure, and it must end here, with a precise
report and no retries, before any GPU time is spent.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import PurePosixPath
from typing import Any

from PIL import Image
from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.images import decode_image, upright_rgb
from infra.jobs import IMAGE_SUFFIXES, JobTicket
from infra.settings import Settings, get_settings
from infra.spec import BadInputError, JobSpec, bad_input, derive_seed, resolve_spec
from infra.store import open_store
from infra.store.base import Store

# Short side when a job names no size: the released model's native 512p; the tiny model
# renders noise, so it gets a size that takes about a second on a CPU.
DEFAULT_SHORT_SIDE = {"tiny": 64}
FALLBACK_SHORT_SIDE = 512


class PreparedJob(BaseModel):
    """Everything the renderer needs, validated."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    stem: str
    spec: JobSpec
    image_file: bytes  # the dropped file as it is: decode_image has checked it decodes
    image_size: tuple[int, int]
    width: int
    height: int
    seed: int
    model: str
    image_sha256: str
    spec_sha256: str | None

    def digest(self) -> str:
        """What the render depends on, as a hash (the image by its sha256): a render handed over
        at detection is awaited only when the flow's own validation gives the same digest."""
        return hashlib.sha256(self.model_dump_json(exclude={"image_file"}).encode()).hexdigest()

    def rgb_image(self) -> Image.Image:
        """The image as the renderer takes it, the same pixels decode_image gave."""
        return upright_rgb(Image.open(io.BytesIO(self.image_file)))


class InputChangedError(RuntimeError):
    """The files changed after the watcher hashed them; the new content is a new job."""


def _unsafe_reference(ticket: JobTicket) -> BadInputError:
    return bad_input("unsafe_path", "image", f"{ticket.spec_key or ticket.image_key}: {ticket.image_ref_error}",
                     "use regular files inside the inbox with printable names; a JSON's \"image\" "
                     "names a file in the same folder or below, e.g. \"image\": \"shoe.png\"")


def _missing_spec(ticket: JobTicket) -> BadInputError:
    name = f"{PurePosixPath(ticket.stem).name}.json"
    return bad_input("missing_spec", "spec", f"{ticket.image_key}: no {name} beside it and no _defaults.json above it",
                     f'drop {name} next to the image, e.g. {{"prompt": "product rotating slowly under studio '
                     'light"}; the video is made when it arrives (this report is then removed)')


def _missing_image(ticket: JobTicket) -> BadInputError:
    if ticket.image_key:
        problem = f"{ticket.spec_key}: its \"image\" names {ticket.image_key}, which is not in the inbox"
    else:
        problem = f"{ticket.spec_key}: no image beside it ({', '.join(IMAGE_SUFFIXES)} of the same name)"
    return bad_input("missing_image", "image", problem,
                     "drop the image next to the JSON with the same name, or name it in \"image\"; the "
                     "video is made when it arrives (this report is then removed)")


def _model_not_offered(ticket: JobTicket, model: str, service_model: str, offered: list[str]) -> BadInputError:
    # Checked here, not on the GPU worker: a typo'd hub id would otherwise be fetched, fail, and retry.
    source = ticket.spec_key or ", ".join(ticket.defaults_keys)
    names = ", ".join(dict.fromkeys([service_model, *offered]))
    return bad_input("unknown_model", "model", f"{source}: model {model!r} is not one this service offers",
                     f'leave "model" out to use the service\'s model ({service_model}) or name one of: '
                     f"{names} (the operator offers more with I2VFLOW_JOB_MODELS)")


# Store errors retry for about two minutes: an S3 server restarting must not lose the job.
@task(name="load-inputs", retries=4, retry_delay_seconds=[2, 10, 30, 60],
      retry_condition_fn=lambda task, run, state: not _is_final(state))
def load_inputs(ticket: JobTicket, overrides: dict[str, Any] | None = None) -> PreparedJob:
    """The job, validated with this process's settings (see ``prepare_job``)."""
    return prepare_job(ticket, get_settings(), overrides)


def prepare_job(ticket: JobTicket, settings: Settings, overrides: dict[str, Any] | None = None) -> PreparedJob:
    """1. read spec layers, 2. validate the spec, 3. read and check the image, 4. pick size and seed.
    ``overrides`` (campaigns) replace spec fields after validation; ``{prompt}`` is the original.
    The watcher calls it too, to hand a render over at detection (``flows.generate.hand_over_render``)."""
    inbox = open_store(ticket.inbox, settings)
    if ticket.missing == "spec":
        raise _missing_spec(ticket)
    if ticket.image_ref_error or (ticket.image_key is None and ticket.missing is None):
        raise _unsafe_reference(ticket)
    layers = [(key, _read(inbox, key, settings.max_spec_bytes, "spec")) for key in ticket.defaults_keys]
    spec_raw = _read(inbox, ticket.spec_key, settings.max_spec_bytes, "spec") if ticket.spec_key else None
    if spec_raw is not None:
        layers.append((ticket.spec_key or "", spec_raw))
    spec = resolve_spec(layers) if layers else resolve_spec([("(no JSON)", b"{}")])
    if ticket.missing == "image":  # after the JSON's own problems, which the user fixes at the same time
        raise _missing_image(ticket)
    if spec.model is not None and not settings.offers_model(spec.model):
        raise _model_not_offered(ticket, spec.model, settings.model, settings.job_models)
    if overrides:
        from infra.campaign import apply_overrides

        spec = apply_overrides(spec, overrides, "campaign overrides")
    image_raw = _read(inbox, ticket.image_key, settings.max_image_bytes, "image")
    image_sha = hashlib.sha256(image_raw).hexdigest()
    spec_sha = hashlib.sha256(spec_raw).hexdigest() if spec_raw is not None else None
    if (image_sha, spec_sha) != (ticket.image_sha256, ticket.spec_sha256):
        raise InputChangedError(f"{ticket.stem}: input changed after detection; the new content is a new job")
    image = decode_image(image_raw, ticket.image_key, settings.max_image_pixels)
    model = spec.model or settings.model
    width, height = spec.frame_size(*image.size, DEFAULT_SHORT_SIDE.get(model, FALLBACK_SHORT_SIDE))
    # The file goes to the GPU worker as dropped: re-encoding a camera photo as PNG cost seconds
    # per job (3.1 s for a 3000x3000 JPEG) and made the payload six times larger.
    return PreparedJob(
        job_id=ticket.job_id, stem=ticket.stem, spec=spec, image_file=image_raw, image_size=image.size,
        width=width, height=height,
        seed=spec.seed if spec.seed is not None else derive_seed(image_sha, spec), model=model,
        image_sha256=image_sha, spec_sha256=spec_sha,
    )


def _read(store: Store, key: str, max_bytes: int, field: str) -> bytes:
    """Read a whole input, refusing oversized ones as bad input and vanished ones as changed."""
    info = store.stat(key)
    if info is None:
        raise InputChangedError(f"{key}: deleted after detection")
    if info.size > max_bytes:
        raise bad_input(f"{field}_too_large", field, f"{key}: {info.size:,} bytes, over the {max_bytes:,} byte limit",
                        "a spec is a small JSON object; an image should be under the limit (resize it)")
    return store.read(key)


def _is_final(state: object) -> bool:
    """Bad input and changed input are final: retrying cannot help."""
    try:
        state.result()  # type: ignore[attr-defined]
    except (BadInputError, InputChangedError):
        return True
    except Exception:
        return False
    return False
