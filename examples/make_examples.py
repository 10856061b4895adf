"""Draw the bundled example inputs (no downloads): a product shot, a landscape, a mug.

Why generated: the repository ships no photos of unknown licence. Run it to recreate
``examples/inbox/``; copy that folder's files into ``data/inbox/`` to try the service.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "inbox"


def shoe() -> Image.Image:
    image = Image.new("RGB", (512, 512), (235, 235, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse([96, 360, 416, 420], fill=(200, 200, 205))  # shadow on the studio floor
    draw.polygon([(110, 350), (150, 250), (260, 240), (330, 300), (410, 320), (400, 360)], fill=(190, 30, 40))
    draw.rectangle([110, 350, 400, 372], fill=(250, 250, 250))  # sole
    return image


def landscape() -> Image.Image:
    image = Image.new("RGB", (768, 432))
    draw = ImageDraw.Draw(image)
    for y in range(432):
        draw.line([(0, y), (768, y)], fill=(90 + y // 6, 150 + y // 8, 230))
    draw.polygon([(0, 330), (200, 180), (380, 320), (560, 150), (768, 320), (768, 432), (0, 432)],
                 fill=(60, 90, 70))
    for x, y in ((120, 80), (430, 60), (620, 110)):
        draw.ellipse([x, y, x + 120, y + 40], fill=(250, 250, 250))
    return image


def mug() -> Image.Image:
    image = Image.new("RGB", (512, 512), (40, 40, 48))
    draw = ImageDraw.Draw(image)
    draw.rectangle([170, 170, 330, 380], fill=(230, 200, 90))
    draw.ellipse([300, 220, 390, 320], outline=(230, 200, 90), width=18)
    draw.ellipse([170, 150, 330, 190], fill=(120, 70, 40))
    return image


EXAMPLES = {
    "shoe": (shoe, {"prompt": "product rotating slowly under studio light", "num_frames": 16, "fps": 8}),
    "landscape": (landscape, {"prompt": "camera slowly zooming in, clouds moving",
                               "negative_prompt": "blurry, distorted"}),
    "mug": (mug, {"prompt": "steam rising from the mug, soft morning light", "seed": 7}),
}


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for name, (draw, spec) in EXAMPLES.items():
        draw().save(HERE / f"{name}.png", optimize=True)
        (HERE / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {len(EXAMPLES)} examples to {HERE}")


if __name__ == "__main__":
    main()
