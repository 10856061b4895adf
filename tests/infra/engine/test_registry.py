"""Model names resolve to weights, and a bad name fails with a message a person can act on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infra.engine.registry import NOISE_WARNING, REGISTRY, ModelEntry, resolve_model


def test_tiny_name_resolves_to_the_built_local_folder(model_cache: Path, tiny_dir: Path) -> None:
    entry = resolve_model("tiny", model_cache)

    assert entry.name == "tiny"
    assert entry.is_noise
    assert Path(entry.source) == tiny_dir.resolve()
    assert (Path(entry.source) / "model_index.json").is_file()


def test_tiny_is_built_on_first_use(tmp_path: Path) -> None:
    entry = resolve_model("tiny", tmp_path / "fresh-cache")

    assert (Path(entry.source) / "model_index.json").is_file()
    assert Path(entry.source).parent == (tmp_path / "fresh-cache").resolve()


def test_i2vgen_xl_name_is_the_hub_checkpoint_in_fp16(tmp_path: Path) -> None:
    entry = resolve_model("i2vgen-xl", tmp_path)

    assert entry == REGISTRY["i2vgen-xl"]
    assert (entry.source, entry.default_dtype_cuda, entry.is_noise) == (
        "ali-vilab/i2vgen-xl",
        "float16",
        False,
    )
    assert list(tmp_path.iterdir()) == []  # nothing fetched or built


def test_local_folder_resolves_and_the_tiny_marker_means_noise(
    tiny_dir: Path, tmp_path: Path
) -> None:
    assert resolve_model(str(tiny_dir), tmp_path) == ModelEntry(
        name=str(tiny_dir), source=str(tiny_dir.resolve()), is_noise=True
    )
    real_looking = tmp_path / "my-model"
    shutil.copytree(tiny_dir, real_looking, ignore=shutil.ignore_patterns("I2VFLOW_*"))
    assert resolve_model(str(real_looking), tmp_path).is_noise is False


def test_hub_ids_resolve_without_network(tmp_path: Path) -> None:
    assert resolve_model("someone/some-model_v1.5", tmp_path) == ModelEntry(
        name="someone/some-model_v1.5", source="someone/some-model_v1.5"
    )
    assert resolve_model("ali-vilab/i2vgen-xl", tmp_path) == REGISTRY["i2vgen-xl"]


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


@pytest.mark.parametrize(
    "value", ["tinyy", "", "   ", "a/b/c", "/no/such/folder", "./missing/model", "owner/"]
)
def test_bad_values_name_the_value_and_the_registry(value: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        resolve_model(value, tmp_path)

    message = str(caught.value)
    assert repr(value.strip()) in message or repr(value) in message
    assert "i2vgen-xl" in message and "tiny" in message


def test_noise_warning_says_how_to_get_real_videos() -> None:
    for needle in (
        "noise",
        "I2VFLOW_MODEL=i2vgen-xl",
        "I2VFLOW_MODEL=/path/to/i2vgen-xl",
        '"model"',
    ):
        assert needle in NOISE_WARNING
