"""The offline tiny model: loadable by the real ``from_pretrained``, small, reproducible, safe."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from diffusers import I2VGenXLPipeline

from infra.engine.tiny import MARKER_NAME, build_tiny_i2vgenxl


def _tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file, keyed by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_tiny_model_loads_with_from_pretrained_and_is_small(tiny_dir: Path) -> None:
    size = sum(path.stat().st_size for path in tiny_dir.rglob("*") if path.is_file())
    assert size < 2 * 1024 * 1024, f"tiny model is {size} bytes"
    assert "RANDOM" in (tiny_dir / MARKER_NAME).read_text()

    pipeline = I2VGenXLPipeline.from_pretrained(tiny_dir)

    assert pipeline.vae_scale_factor == 4  # three VAE levels: fast on CPU
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    crop = pipeline.feature_extractor.crop_size
    assert (crop["height"], crop["width"]) == (pipeline.image_encoder.config.image_size,) * 2


def test_tiny_tokenizer_encodes_any_prompt_without_unknown_tokens(tiny_dir: Path) -> None:
    tokenizer = I2VGenXLPipeline.from_pretrained(tiny_dir).tokenizer
    ids = tokenizer("a cat 猫 🐱", padding="max_length", max_length=77).input_ids

    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    words = tokenizer.convert_ids_to_tokens(ids[1:4])
    assert words == ["a</w>", "c", "a"]  # byte-level, no merges: one token per byte
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a cat 猫 🐱"


def test_build_is_idempotent(tiny_dir: Path) -> None:
    before = _tree_digest(tiny_dir)
    index_mtime = (tiny_dir / "model_index.json").stat().st_mtime_ns

    assert build_tiny_i2vgenxl(tiny_dir) == tiny_dir.resolve()

    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == index_mtime
    assert _tree_digest(tiny_dir) == before


def test_build_is_reproducible_and_race_safe(tiny_dir: Path, tmp_path: Path) -> None:
    """Two concurrent builds into one folder give one complete model equal to the session's."""
    target = tmp_path / "cache" / "tiny"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_tiny_i2vgenxl(target))
        except BaseException as error:  # surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results == [target.resolve()] * 2
    assert _tree_digest(target) == _tree_digest(tiny_dir)  # seeded: byte-identical weights
    leftovers = [p.name for p in target.parent.iterdir() if p.name not in ("tiny", ".tiny.lock")]
    assert leftovers == []


def test_interrupted_build_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "half-written.bin").write_bytes(b"x")

    build_tiny_i2vgenxl(target)

    assert (target / "model_index.json").is_file()
    assert not (target / "half-written.bin").exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "image_encoder"])
def test_weights_are_safetensors(tiny_dir: Path, component: str) -> None:
    assert list((tiny_dir / component).glob("*.safetensors")), component
