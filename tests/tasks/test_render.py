"""The render task decides whose problem a failed render is: the job's (final, an error report
for the user) or the service's (retried, then the flow fails and the reconciler tries again)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: never the hub

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from prefect.states import Failed  # noqa: E402

from infra.engine.engine import ModelUnavailable  # noqa: E402
from infra.settings import get_settings  # noqa: E402
from infra.spec import JobSpec  # noqa: E402
from tasks.inputs import PreparedJob  # noqa: E402
from tasks.render import RenderFailed, _retry_unless_bad_input, render_video  # noqa: E402
from tests.helpers import png_bytes  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("I2VFLOW_DEVICE", "cpu")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _job(model: str) -> PreparedJob:
    return PreparedJob(job_id="j1", stem="mug", spec=JobSpec(prompt="mug turning", num_frames=8, steps=10),
                       image_file=png_bytes(), image_size=(96, 96), width=64, height=64, seed=1, model=model,
                       image_sha256="0" * 64, spec_sha256=None)


def test_a_model_the_gpu_worker_cannot_load_is_retried_not_blamed_on_the_job() -> None:
    """The flow's host offered the model (I2VFLOW_JOB_MODELS) but this GPU worker's host lacks
    it: before, that ValueError became the user's final `render_failed` report."""
    with pytest.raises(ModelUnavailable, match="/srv/models/not-synced-yet") as caught:
        render_video.fn(_job("/srv/models/not-synced-yet"))
    assert not isinstance(caught.value, RenderFailed)
    assert _retry_unless_bad_input(render_video, None, Failed(data=caught.value)) is True


def test_a_request_the_engine_refuses_is_final_and_the_jobs() -> None:
    """A size the pipeline cannot take (a multiple of 8 is required) fails as the job's problem."""
    job = _job("tiny").model_copy(update={"width": 60})
    with pytest.raises(RenderFailed, match="`width` must be a multiple of 8") as caught:
        render_video.fn(job)
    assert _retry_unless_bad_input(render_video, None, Failed(data=caught.value)) is False
