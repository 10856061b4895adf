"""Which weights a model name means: the registry and ``resolve_model``.

Why: jobs and settings name a model with one string (``I2VFLOW_MODEL`` or ``"model"`` in the
job JSON). That string may be a short registry name (``tiny``, ``i2vgen-xl``), a local folder
saved by ``save_pretrained``, or a hub id. Resolving it in one place gives one precise error
for a typo instead of a hub timeout deep inside ``from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from infra.engine.tiny import MARKER_NAME, build_tiny_i2vgenxl

NOISE_WARNING = (
    "The 'tiny' model has RANDOM weights: every video it renders is noise. It exists for "
    "tests and demos. For real videos point i2vflow at the I2VGen-XL weights: "
    "I2VFLOW_MODEL=i2vgen-xl (hub id ali-vilab/i2vgen-xl, needs hub access) or "
    "I2VFLOW_MODEL=/path/to/i2vgen-xl (a local folder saved by save_pretrained), "
    'or set "model" in the job JSON.'
)

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelEntry:
    """One set of weights the engine can load.

    ``source`` is what ``from_pretrained`` receives: a hub id or a local folder. ``is_noise``
    marks random weights so every render can warn loudly. ``variant`` names the weight files
    to fetch (``fp16`` halves the hub download) and is used only when loading in float16.
    """

    name: str
    source: str
    pipeline_class: str = "I2VGenXLPipeline"
    is_noise: bool = False
    default_dtype_cuda: str = "float16"
    variant: str | None = None


# Entries whose weights are built locally keep a source relative to the model cache.
REGISTRY: dict[str, ModelEntry] = {
    "i2vgen-xl": ModelEntry(name="i2vgen-xl", source="ali-vilab/i2vgen-xl", variant="fp16"),
    "tiny": ModelEntry(name="tiny", source="tiny-i2vgen-xl", is_noise=True),
}
_LOCAL_BUILDERS: dict[str, Callable[[Path], Path]] = {"tiny": build_tiny_i2vgenxl}


def resolve_model(name_or_source: str, model_cache: Path) -> ModelEntry:
    """Turn a registry name, a local folder or a hub id into a ``ModelEntry``.

    Order: registry name (a locally built one, like ``tiny``, is built into ``model_cache``
    on first use), then an existing local folder, then a hub id shaped ``owner/name``.
    Anything else raises ``ValueError`` naming the value and the registry names.
    """
    value = name_or_source.strip() if isinstance(name_or_source, str) else name_or_source
    if not isinstance(value, str) or not value:
        raise ValueError(f"`model` must be a non-empty string but is {name_or_source!r}. {_hint()}")
    if value in REGISTRY:
        return _registry_entry(value, Path(model_cache))
    local = Path(value).expanduser()
    if local.is_dir():
        return _local_entry(value, local)
    if HUB_ID_PATTERN.match(value) and not value.startswith((".", "~")):
        known = [entry for entry in REGISTRY.values() if entry.source == value]
        return known[0] if known else ModelEntry(name=value, source=value)
    raise ValueError(
        f"`model` {value!r} is not a registry name, not an existing local folder and not a hub "
        f"id shaped 'owner/name'. {_hint()}"
    )


def _hint() -> str:
    return f"Registry names: {', '.join(sorted(REGISTRY))}."


def _registry_entry(name: str, model_cache: Path) -> ModelEntry:
    """Return the registry entry, building local weights into the cache when needed."""
    entry = REGISTRY[name]
    builder = _LOCAL_BUILDERS.get(name)
    if builder is None:
        return entry
    folder = builder(model_cache.expanduser() / entry.source)
    return replace(entry, source=str(folder))


def _local_entry(value: str, folder: Path) -> ModelEntry:
    """An entry for a folder saved by ``save_pretrained``; the tiny marker means noise."""
    folder = folder.resolve()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"`model` {value!r} is a folder but holds no model_index.json: expected a pipeline "
            f"saved by save_pretrained. {_hint()}"
        )
    return ModelEntry(name=value, source=str(folder), is_noise=(folder / MARKER_NAME).is_file())
