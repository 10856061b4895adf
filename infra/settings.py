"""All i2vflow configuration in one pydantic-settings object.

Why: one place, one prefix. Every knob is an environment variable ``I2VFLOW_<FIELD>``
(``I2VFLOW_INBOX=s3://assets/inbox/``), optionally preset by a TOML file named in
``I2VFLOW_CONFIG``; the environment wins over the file. Secrets are ``SecretStr`` so they
print as ``**********`` wherever a settings object is logged.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from infra.engine.guidance_interval import check_interval
from infra.logging import register_secret


class Settings(BaseSettings):
    """Settings of the watcher, the workers and the engine."""

    model_config = SettingsConfigDict(env_prefix="I2VFLOW_", extra="forbid")

    # Where jobs come from and where videos go: a folder path or s3://bucket/prefix.
    inbox: str = "data/inbox"
    outbox: str = "data/outbox"
    # Ledger, logs and other local state of this host.
    state_dir: Path = Path("data/state")
    log_file: Path | None = None  # default: <state_dir>/logs/i2vflow.log

    # Watcher.
    rescan_seconds: float = Field(2.0, gt=0, description="Full rescan interval (the truth).")
    settle_seconds: float = Field(
        0.5, ge=0, description="Min gap between the two looks that settle a file no close event vouched for.")
    submit_lease_seconds: float = Field(30.0, gt=0, description="A dead submitter's claim expires after this.")
    reconcile_seconds: float = Field(60.0, gt=0, description="How often ledger, runs and outbox are compared.")
    orphan_seconds: float = Field(300.0, ge=0, description="An image with no JSON (and no _defaults.json above "
                                  "it), or a JSON with no image, settled this long gets NAME.error.json saying "
                                  "what is missing; the job still starts when the file arrives. 0: wait silently.")
    max_reschedules: int = Field(3, ge=0, description="A job's attempts (its submission and the reconciler's "
                                 "reschedules) before a crashed run is given up: service_failed.")
    max_spec_bytes: int = Field(256 * 1024, gt=0)
    max_image_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)

    # Prefect wiring.
    deployment: str = "generate-video/generate-video"
    work_pool: str = "i2vflow"
    gpu_limit: int = Field(1, ge=1, description="Size of the `gpu` tag concurrency limit: render slots across "
                           "the fleet; give it GPU workers x I2VFLOW_GPU_WORKER_SLOTS (`up` raises it to that).")
    gpu_worker_slots: int = Field(2, ge=1, le=8, description="Renders a GPU worker holds at once: one on the GPU, "
                                  "the others staged (task run started, inputs decoded, waiting for the GPU), so "
                                  "the next render starts the moment the GPU is free instead of after Prefect's "
                                  "hand-over (~0.4 s per video measured). 1: no staging.")
    flow_forkserver: bool = Field(True, description="`up` starts flow runs as forks of a process that has "
                                  "imported Prefect and the flows once (infra/forkserver.py; Linux), not as fresh "
                                  "interpreters: 1.4-1.8 s less per lone job on a GPU host. false: a fresh "
                                  "interpreter per run.")
    flow_worker_events: bool = Field(True, description="The flow worker asks for scheduled flow runs the moment "
                                     "the server's event stream announces one in its pool (infra/flowworker.py), not "
                                     "only at its next poll. false: poll only (an API proxy that does not pass "
                                     "websockets).")
    sqlite_queued_writes: bool = Field(True, description="The Prefect server `up` starts on SQLite begins its write "
                                       "transactions IMMEDIATE, so concurrent writers wait their turn instead of "
                                       "failing with 'database is locked' and a 2 s client retry "
                                       "(infra/prefectserver.py). false: Prefect's own DEFERRED transactions.")
    early_render: bool = Field(True, description="The watcher validates a job's inputs as the flow will and hands "
                               "its render to the GPU worker when it submits the job, so the render starts while "
                               "the flow run is still being claimed and started; the flow awaits it (a lone job's "
                               "overhead over its render 1.76 -> 0.58 s on an H100). false: the flow submits the "
                               "render after its own validation. On a Prefect server on SQLite that `up` did not "
                               "start, the render's start and the run's creation can collide: 2 s client retries.")
    render_head_start_seconds: float = Field(
        0.5, ge=0, description="With early_render, the longest the watcher waits for a handed-over render to "
        "start on a GPU worker before it creates the job's flow run, so the render's start (its gpu slot, a "
        "database write) does not queue behind the run's creation: a lone job's render started 0.13 -> 0.06 s "
        "after the drop on the CPU box. A render no GPU worker takes at once (all busy) is not waited for, "
        "and neither are the jobs after it while renders queue. 0: no wait.")
    gpu_workers: int = Field(0, ge=0, description="GPU task workers `up` starts, one per card, each bound to "
                             "it; 0: one per visible CUDA device (one on a host without CUDA).")
    render_timeout_seconds: float = Field(1800.0, gt=0)
    result_ttl_seconds: float = Field(7200.0, gt=0, description="GPU workers delete Prefect's local result "
                                      "files (frames, task parameters) older than this; longer than "
                                      "render_timeout_seconds, since a result is read within it.")
    zombie_after_seconds: float = Field(90.0, gt=30, description="A flow run with no heartbeat (every 30 s) or "
                                        "state change for this long is marked Crashed, then rescheduled.")

    # Model engine.
    model: str = "tiny"
    job_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["tiny", "i2vgen-xl"],
        description='What a job\'s "model" may name (comma list of registry names, local folders, hub ids); '
        "I2VFLOW_MODEL is always allowed. Anything else is bad input, refused before any GPU time.")
    model_cache: Path = Path("data/models")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    memory_mode: Literal["auto", "full", "slicing", "offload"] = "auto"
    speed_preset: Literal["auto", "stock", "fast"] = Field("auto", description="Engine speed levers "
                                                          "(docs/performance.md); auto: fast on CUDA.")
    compile_scope: Literal["model", "blocks"] = Field("model", description="With compilation on: one graph "
                                                      "(model) or each repeated block (blocks: no AOT packages, "
                                                      "every start compiles).")
    compile_aot: bool | None = Field(None, description="Compile the UNet ahead of time into AOTInductor "
                                     "packages (one per shape) that later starts load in seconds; unset: the "
                                     "preset's choice.")
    short_attention: bool | None = Field(None, description="Temporal self-attention through a Triton kernel "
                                         "(CUDA); unset: the preset's choice (on in fast).")
    channels_last_group_norm: bool | None = Field(None, description="Temporal GroupNorm statistics read "
                                                  "along channels-last memory by a Triton kernel (CUDA) where "
                                                  "a norm's input outgrows the L2 cache; unset: the preset's "
                                                  "choice (on in fast).")
    channels_last_inputs: bool | None = Field(None, description="Every UNet ResNet block's input stored "
                                              "channels-last inside the compiled graph (with channels-last "
                                              "and compilation); unset: the preset's choice (on in fast).")
    host_timesteps: bool | None = Field(None, description="Scheduler timesteps on the host: no host sync per "
                                        "denoising step; unset: the preset's choice (on in fast).")
    coordinate_descent_tuning: bool | None = Field(None, description="Inductor tunes every generated kernel "
                                                   "while compiling (CUDA): 2.2% faster renders, a first compile "
                                                   "2.5 times as long; for hosts that keep the compile cache. "
                                                   "Unset: the preset's choice (off in every preset).")
    fp8_linear: bool = Field(False, description="Transformers' Linear layers as fp8 matmuls (Ada/Hopper; "
                             "changes numerics, docs/performance.md gives the drift).")
    scheduler: Literal["default", "dpm++"] = Field("default", description="Quality-trading, opt-in: "
                                                   "DPM-Solver++ instead of the model's DDIM (pair with max_steps).")
    max_steps: int | None = Field(None, ge=1, description="Quality-trading, opt-in: cap every job's denoising "
                                  "steps (the sidecar records the steps really run).")
    guidance_interval: Annotated[tuple[float, float] | None, NoDecode] = Field(
        None, description="Quality-trading, opt-in: LOW,HIGH noise levels (timestep / 1000: 1 is pure noise, "
        "0 a clean image) where classifier-free guidance runs, e.g. 0.1,0.9; elsewhere a step runs the UNet "
        "on the prompt alone, about half its work (the sidecar records the steps guided).")
    feature_cache_interval: int | None = Field(None, ge=2, description="Quality-trading, opt-in: a full UNet "
                                               "step every N steps; the steps between run only its outer level "
                                               "on the deep features kept from the last full one (DeepCache; the "
                                               "sidecar records the steps that reused them).")
    oom_fallback: bool = True
    warmup_shapes: str = Field("", description="WxHxF,... rendered (2 steps) at GPU-worker start; "
                               "empty: the model's default size at 16 frames.")

    # S3-compatible bucket (used when inbox/outbox start with s3://).
    s3_endpoint: str = "localhost:9000"
    s3_region: str | None = None
    s3_secure: bool = False
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secret_block: str | None = None  # Prefect Secret block holding "ACCESS:SECRET"
    presign_expiry_seconds: int = Field(7 * 24 * 3600, gt=0, le=7 * 24 * 3600)
    poll_seconds: float = Field(5.0, gt=0)
    webhook_port: int = Field(0, ge=0, le=65535, description="0 disables the webhook.")
    webhook_host: str = Field("127.0.0.1", description="Bind address (0.0.0.0 in a container).")
    webhook_token: SecretStr | None = None

    # Prometheus endpoints (docs/operations.md); 0 disables one.
    metrics_port: int = Field(9464, ge=0, le=65535, description="The watcher's /metrics port.")
    gpu_worker_metrics_port: int = Field(9465, ge=0, le=65535, description="The GPU worker's /metrics port.")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics (0.0.0.0 in a container).")
    metrics_poll_seconds: float = Field(15.0, gt=0, description="How often the watcher reads outcomes from Prefect.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("I2VFLOW_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @field_validator("job_models", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

    @field_validator("guidance_interval", mode="before")
    @classmethod
    def _low_high(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",")) if value.strip() else None
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _noise_levels(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None:
            check_interval(value)
        return value

    def offers_model(self, model: str) -> bool:
        """Whether a job may ask for ``model`` (its own \"model\" field)."""
        return model == self.model or model in self.job_models

    @model_validator(mode="after")
    def _results_outlive_renders(self) -> Settings:
        if self.result_ttl_seconds <= self.render_timeout_seconds:
            raise ValueError(
                f"result_ttl_seconds ({self.result_ttl_seconds:g}) must be longer than render_timeout_seconds "
                f"({self.render_timeout_seconds:g}): a flow reads its render's result up to that long after "
                "submitting it; raise I2VFLOW_RESULT_TTL_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _outbox_apart_from_inbox(self) -> Settings:
        # Outputs are named after their inputs: an outbox inside (or equal to) the inbox would put
        # NAME.json sidecars over the jobs' own NAME.json, and an inbox inside the outbox would
        # watch the outputs as new drops.
        inbox, outbox = _location_parts(self.inbox), _location_parts(self.outbox)
        shorter = min(len(inbox), len(outbox))
        if inbox[:shorter] == outbox[:shorter]:
            raise ValueError(
                f"inbox ({self.inbox}) and outbox ({self.outbox}) overlap: videos and sidecars are named after "
                "their inputs and would overwrite them or be watched as new drops; give I2VFLOW_OUTBOX its own "
                "folder or prefix beside the inbox, e.g. data/outbox or s3://assets/outbox"
            )
        return self

    @model_validator(mode="after")
    def _secrets_never_logged(self) -> Settings:
        # Wherever a secret came from (environment or I2VFLOW_CONFIG's file), log lines mask it.
        register_secret(*(s.get_secret_value() for s in (self.s3_access_key, self.s3_secret_key, self.webhook_token)
                          if s is not None))
        return self

    @property
    def resolved_log_file(self) -> Path:
        return self.log_file or self.state_dir / "logs" / "i2vflow.log"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"


def _location_parts(location: str) -> tuple[str, ...]:
    """A folder or ``s3://bucket/prefix`` as path segments, so nesting is a shared beginning."""
    if location.startswith("s3://"):
        return ("s3:", *(part for part in location.removeprefix("s3://").split("/") if part))
    if location.startswith("file://"):
        location = unquote(urlsplit(location).path)
    return ("file:", *Path(location).expanduser().resolve().parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
