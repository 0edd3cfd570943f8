"""Bytes to an RGB image, with memory bounded before a pixel is decoded.

- Only common web formats are parsed (no EPS, which would run Ghostscript, nor TIFF).
- Width x height from the header must not exceed COFEAT_IMAGE_MAX_PIXELS: a decompression
  bomb (a small file claiming a huge canvas) is refused before decoding, in microseconds.
- JPEGs decode in draft mode, at 1/2..1/8 scale, when the model needs fewer pixels.
- Other formats are box-reduced right after decoding, before the RGB conversion and the
  compositing on white, which would otherwise each hold another full-size copy.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from shared.images.errors import NotAnImage, TooManyPixels

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# What PIL raises for broken, truncated or hostile files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                 KeyError, ZeroDivisionError, MemoryError)
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "La", "CMYK", "I", "F")


def decode(data: bytes, image_size: int | None, max_pixels: int) -> Image.Image:
    """RGB, at least 2 x image_size on its short side where the source had that much."""
    with warnings.catch_warnings():
        # PIL's own, looser bomb check warns from ~89M pixels (and raises from twice
        # that): ours below comes first and says more.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:
            raise TooManyPixels(max_pixels) from None
        except UnidentifiedImageError:
            raise NotAnImage("unknown format") from None
        except DECODE_ERRORS as error:
            raise NotAnImage(_detail(error)) from None
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise TooManyPixels(max_pixels, width, height)
            if width < 1 or height < 1:
                raise NotAnImage(f"{width}x{height} pixels")
            try:
                if image_size:
                    img.draft("RGB", (2 * image_size, 2 * image_size))
                img.load()
                return rgb(_reduce(img, image_size))
            except Image.DecompressionBombError:
                raise TooManyPixels(max_pixels, width, height) from None
            except DECODE_ERRORS as error:
                raise NotAnImage(_detail(error)) from None


def _reduce(img: Image.Image, image_size: int | None) -> Image.Image:
    if not image_size:
        return img
    factor = min(img.size) // (2 * image_size)
    if factor < 2:
        return img
    if img.mode not in _REDUCIBLE:
        img = img.convert("RGBA" if _transparent(img) else "RGB")
    return img.reduce(factor)


def rgb(img: Image.Image) -> Image.Image:
    # Transparent areas go on white, as a page shows them; a plain convert would expose
    # whatever colour the invisible pixels happen to hold (often black).
    if _transparent(img):
        rgba = img.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return img.convert("RGB")


def _transparent(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)


def _detail(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
