"""Decode a dropped image safely, or say precisely why it cannot be used.

Why before the GPU: a corrupt file, a non-image, or a decompression bomb (a small PNG that
claims 100,000 x 100,000 pixels) must become an error report, not a crash or a retry.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from infra.spec import BadInputError, bad_input

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
MIN_SIDE = 16


def _bad(key: str, problem: str, fix: str) -> BadInputError:
    return bad_input("invalid_image", "image", f"{key}: {problem}", fix)


def decode_image(raw: bytes, key: str, max_pixels: int) -> Image.Image:
    """1. identify the format, 2. check the declared size before decoding, 3. decode fully,
    4. turn it upright and to RGB. Raise BadInputError with a fix for the person who dropped it."""
    if not raw:
        raise _bad(key, "the file is empty (0 bytes)", "drop the image again; the copy may have failed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.format not in ALLOWED_FORMATS:
                raise _bad(key, f"format {image.format} is not supported", "use PNG, JPEG or WebP")
            _check_size(key, *image.size, max_pixels)
            image.load()
    except BadInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bad(key, f"rejected as a decompression bomb ({exc})", "use an ordinary photo-sized image") from None
    except UnidentifiedImageError:
        raise _bad(key, f"not an image file (it starts with {raw[:12]!r})",
                   "drop a PNG, JPEG or WebP image; check the file opens in an image viewer") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _bad(key, f"not a readable image ({type(exc).__name__}: {exc})",
                   "export the file again as PNG or JPEG; it may be truncated or damaged") from None
    return upright_rgb(image)


def upright_rgb(image: Image.Image) -> Image.Image:
    """The pixels as a viewer shows them: rotated by the EXIF orientation cameras and phones write."""
    return ImageOps.exif_transpose(image).convert("RGB")


def _check_size(key: str, width: int, height: int, max_pixels: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise _bad(key, f"{width}x{height} is too small: under {MIN_SIDE} pixels on a side",
                   "use the original photo; 512 pixels or more on the short side gives the best video")
    if width * height > max_pixels:
        raise _bad(key, f"{width}x{height} is {width * height:,} pixels, over the {max_pixels:,} pixel limit",
                   "resize the image (e.g. to 1024 pixels on the long side)")
