"""Build a tiny I2VGen-XL pipeline with random weights, fully offline.

Why: tests, CI and a laptop demo need the *real* pipeline code path (``from_pretrained``,
the same ``__call__``, the same MP4 encoding) without a 10 GB download or a model hub.
The architecture is I2VGen-XL shrunk to a few thousand parameters per component; the
weights are random, so the videos are noise. The configs live as JSON files in
``infra/engine/configs/tiny-i2vgen-xl/`` so the shape of the model is reviewable data.

Heavy imports (torch, diffusers, transformers) happen inside the functions, so the registry
can be imported by light processes (the watcher validating a job's model name).

The VAE has three levels of 8 channels (scale factor 4): the test-suite VAE of diffusers has
one level (scale factor 1) and attends over every pixel, which is ~70x slower on CPU.

Run as a script to build into a folder: ``python -m infra.engine.tiny data/models/tiny-i2vgen-xl``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs" / "tiny-i2vgen-xl"
MARKER_NAME = "I2VFLOW_TINY_MODEL.txt"
MARKER_TEXT = """\
This folder holds a TINY I2VGen-XL pipeline with RANDOM weights, built offline by
infra/engine/tiny.py for tests and demos. Every video it renders is noise.
For real videos point I2VFLOW_MODEL at the real weights:
  I2VFLOW_MODEL=i2vgen-xl                 (hub id ali-vilab/i2vgen-xl, needs hub access)
  I2VFLOW_MODEL=/path/to/i2vgen-xl        (a local folder saved by save_pretrained)
or set "model" in the job JSON.
"""
SEED = 0


def component_config(name: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """Read one component's config dict from the JSON files shipped in the repo."""
    return json.loads((Path(config_dir) / f"{name}.json").read_text())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable unicode characters.

    Why here: transformers 5 no longer exports it from ``tokenization_clip``; the map is
    fixed by the byte-level BPE that CLIP's tokenizer applies before its vocabulary lookup.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary: every byte char, its ``</w>`` form, two specials.

    Why: with this vocabulary and no merges, BPE falls back to one token per byte, so any
    prompt (any language, emoji) encodes without unknown tokens and without the 1.6 MB
    real CLIP vocabulary.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [f"{c}</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(config_dir: Path = CONFIG_DIR) -> Any:
    """Build a ``CLIPTokenizer`` offline from the byte-level vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], **component_config("tokenizer", config_dir))


def build_components(
    config_dir: Path = CONFIG_DIR, device: str | None = None, dtype: Any = None
) -> dict[str, Any]:
    """Create every pipeline component from its JSON config, with seeded random weights.

    Why seeded: two builds (two hosts, two test sessions) must give byte-identical weights,
    so a video rendered from the tiny model is reproducible anywhere. ``device`` creates the
    weights there (a full-size build initialises ~2.4 G parameters: seconds on a GPU, minutes
    on a CPU); ``dtype`` casts them afterwards (random init always runs in float32).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLUNet
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    def config(name: str) -> dict[str, Any]:
        return component_config(name, config_dir)

    tokenizer = build_tokenizer(config_dir)
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        **config("text_encoder"),
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(SEED)
    if device is not None and device.startswith("cuda"):
        torch.cuda.manual_seed_all(SEED)
    with torch.device(device or "cpu"):
        models = {
            "unet": I2VGenXLUNet.from_config(config("unet")),
            "vae": AutoencoderKL.from_config(config("vae")),
            "text_encoder": CLIPTextModel(text_config),
            "image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig(**config("image_encoder"))
            ),
        }
    for model in models.values():
        model.eval()
        if dtype is not None:
            model.to(dtype)
    return {
        **models,
        "feature_extractor": CLIPImageProcessor(**config("feature_extractor")),
        "scheduler": DDIMScheduler.from_config(config("scheduler")),
        "tokenizer": tokenizer,
    }


@contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock beside ``target`` (two workers may race to build)."""
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """Open up ``mkdtemp``'s 0700 folder and safetensors' 0600 files to other users.

    Why: the model cache is shared (a worker in a container may run as another user).
    """
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _is_built(target: Path) -> bool:
    return (target / "model_index.json").is_file()


def build_tiny_i2vgenxl(target: Path) -> Path:
    """Build the tiny random-weight I2VGen-XL into ``target`` once; return ``target``."""
    return build_pipeline_folder(target, CONFIG_DIR, MARKER_TEXT)


def build_pipeline_folder(
    target: Path,
    config_dir: Path,
    marker_text: str,
    device: str | None = None,
    dtype: Any = None,
) -> Path:
    """Build a random-weight I2VGen-XL from ``config_dir`` into ``target`` once.

    Idempotent and safe to call from several processes at once: an existing
    ``target/model_index.json`` means built; otherwise the build happens in a temp folder
    beside ``target`` under a file lock and is renamed into place, so a reader never sees
    a half-written model.
    """
    target = Path(target).expanduser().resolve()
    if _is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if _is_built(target):  # another process finished while we waited for the lock
            return target
        from diffusers import I2VGenXLPipeline

        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            pipeline = I2VGenXLPipeline(**build_components(config_dir, device, dtype))
            pipeline.save_pretrained(staging)
            del pipeline
            (staging / MARKER_NAME).write_text(marker_text)
            _make_readable(staging)
            if target.exists():  # a leftover without model_index.json: an interrupted build
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m infra.engine.tiny TARGET_DIR")
    print(build_tiny_i2vgenxl(Path(sys.argv[1])))
