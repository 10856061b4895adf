"""Build the FULL-SIZE I2VGen-XL architecture with random weights, offline.

Why: no model hub is reachable where the engine is developed and benchmarked, yet speed must
be measured on the real compute. Random weights cost exactly the compute of the released
checkpoint (same shapes, same kernels). Configs live in ``configs/i2vgen-xl-full/``:

- UNet: ``I2VGenXLUNet()`` defaults (1.42 G parameters, as released);
- text encoder: OpenCLIP ViT-H/14 text tower (1024 wide, 24 layers);
- image encoder: CLIP ViT-H/14 vision (1280 wide, 32 layers, projection 1024);
- VAE: the SD 1.x ``AutoencoderKL``; scheduler: DDIM as released.

The tokenizer is the byte-level one of ``tiny.py`` (514 tokens instead of CLIP's 49,408:
only the embedding table is smaller, the compute per token is the same).

Run as a script: ``python -m infra.engine.full data/models/i2vgen-xl-random [cuda]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from infra.engine.tiny import build_pipeline_folder

FULL_CONFIG_DIR = Path(__file__).parent / "configs" / "i2vgen-xl-full"
FULL_MARKER_TEXT = """\
This folder holds the FULL-SIZE I2VGen-XL architecture with RANDOM weights, built offline
by infra/engine/full.py for speed benchmarks. Every video it renders is noise; its compute
per step equals the released checkpoint's.
"""


def build_full_i2vgenxl(target: Path, device: str | None = None) -> Path:
    """Build the full-size random-weight pipeline into ``target`` once (fp16 safetensors).

    ``device`` None means CUDA when present (initialising 2.4 G parameters on a CPU takes
    minutes, on a GPU seconds). Weights are saved in float16; the loader casts on load.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_pipeline_folder(target, FULL_CONFIG_DIR, FULL_MARKER_TEXT, device, torch.float16)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m infra.engine.full TARGET_DIR [DEVICE]")
    print(build_full_i2vgenxl(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else None))
