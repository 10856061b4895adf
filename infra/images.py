"""Decode a dropped image safely, or say precisely why it cannot be used.

Why before the GPU: a corrupt file, a non-image, or a decompression bomb (a small PNG that
claims 100,000 x 100,000 pixels) must become an error report, not a crash or a retry.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from infra.spec import BadInputError, ErrorReport, FieldProblem

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def _bad(key: str, problem: str, fix: str) -> BadInputError:
    item = FieldProblem(field="image", problem=f"{key}: {problem}", fix=fix)
    return BadInputError(ErrorReport(error="invalid_image", message=item.problem, problems=[item]))


def decode_image(raw: bytes, key: str, max_pixels: int) -> Image.Image:
    """1. identify the format, 2. check the declared size before decoding, 3. decode fully,
    4. convert to RGB. Raise BadInputError with a fix for the person who dropped it."""
    if not raw:
        raise _bad(key, "the file is empty (0 bytes)", "drop the image again; the copy may have failed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.format not in ALLOWED_FORMATS:
                raise _bad(key, f"format {image.format} is not supported", "use PNG, JPEG or WebP")
            width, height = image.size
            if width * height > max_pixels or min(width, height) < 16:
                raise _bad(key, f"declared size {width}x{height} is outside 16x16 .. {max_pixels:,} pixels",
                           "resize the image (e.g. to 1024 pixels on the long side)")
            image.load()
    except BadInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bad(key, f"rejected as a decompression bomb ({exc})", "use an ordinary photo-sized image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _bad(key, f"not a readable image ({type(exc).__name__}: {exc})",
                   "export the file again as PNG or JPEG; it may be truncated or not an image") from None
    return image.convert("RGB")
