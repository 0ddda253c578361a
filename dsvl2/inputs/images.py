"""Turn user-supplied image files into fully decoded 8-bit RGB PIL images, or refuse them clearly.

Everything here runs before any model work: a file that is not an image, is truncated, is too large
to read or decode safely, or is too thin to tile raises `ImageError` naming the problem (and the limit).
Messages name the image as the caller does (`name`, e.g. the input field), never by a server path.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dsvl2.errors import ImageError

# Refuse anything larger before a single pixel is decoded: 64 MP of RGB is ~200 MB in memory
# and far more detail than the at most 1152x1152 pixels (3x3 tiles of 384) the model ever sees.
MAX_IMAGE_PIXELS = 64_000_000

# Refuse larger files before they are parsed: PIL reads the chunks before a PNG's pixels into memory,
# whatever their size. 100 MiB is coglet's limit on a whole request, and more than a 64 MP JPEG needs.
MAX_IMAGE_BYTES = 100 * 2**20

# The global view squeezes the longer side into 384 px; past about 768:1 the shorter side would
# round to 0 px and the resize fails. 500:1 leaves a margin and is easy to state.
MAX_ASPECT_RATIO = 500

# Only these decoders may run on untrusted bytes (e.g. EPS would shell out to Ghostscript).
# JPEG covers MPO (multi-picture JPEGs from phones); AVIF only where this PIL build has it.
Image.init()
FORMATS = tuple(
    f for f in ("PNG", "JPEG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM", "TGA", "ICO") if f in Image.OPEN
)

# What PIL raises for malformed image data while parsing headers or decoding pixels.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

# Integer greyscale modes holding 16-bit samples (PNG 16-bit greyscale opens as "I;16" or "I").
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def check_size(width: int, height: int, name: str = "image") -> None:
    """Raise `ImageError` unless a width x height image is within the pixel and aspect limits."""
    if width < 1 or height < 1:
        raise ImageError(f"{name} is {width}x{height}: it has no pixels")
    pixels = width * height
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name} is {width}x{height} = {pixels} pixels, over the limit of {MAX_IMAGE_PIXELS} "
            f"({MAX_IMAGE_PIXELS // 1_000_000} megapixels); downscale it first"
        )
    long_side, short_side = max(width, height), min(width, height)
    if long_side > MAX_ASPECT_RATIO * short_side:
        raise ImageError(
            f"{name} is {width}x{height}, an aspect ratio of {long_side / short_side:.0f}:1, "
            f"over the limit of {MAX_ASPECT_RATIO}:1; crop or pad it first"
        )


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """A new 8-bit RGB copy of `image` (alpha is dropped, as the reference's `.convert("RGB")` does).

    16-bit greyscale is rescaled 0..65535 -> 0..255; PIL's own conversion would clip it at 255.
    """
    if image.mode in _WIDE_INT_MODES:
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)  # [H, W]
        grey = (wide * 255 + 32767) // 65535  # round(v * 255 / 65535) in integers
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert, e.g. "La"
        raise ImageError(f"{name} has colour mode {image.mode!r}, which cannot be converted to RGB: {e}") from e


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode a file path or raw bytes into an RGB image, with EXIF orientation applied.

    Animated images give their first frame. The pixels are decoded here (not lazily) so that a
    truncated file fails now, as an `ImageError`, rather than later inside preprocessing. Errors
    call the image `name` (default: "image", or "image file '<path>'" for a path).
    """
    fp: str | io.BytesIO
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "image"
        size = len(source)
        fp = io.BytesIO(source)
    else:
        fp = os.fspath(source)
        name = name or f"image file {fp!r}"
        try:
            size = os.path.getsize(fp)
        except OSError as e:
            raise ImageError(f"{name} cannot be read: {e.strerror}") from e
    if size == 0:
        raise ImageError(f"{name} is empty (0 bytes)")
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"{name} is {size} bytes, over the limit of {MAX_IMAGE_BYTES} bytes "
                         f"({MAX_IMAGE_BYTES // 2**20} MiB); downscale or compress it first")

    with warnings.catch_warnings():
        # PIL warns from ~89 MP, below which our own check_size refuses with a clearer message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp, formats=FORMATS)  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"{name} is too large to decode safely, over the limit of {MAX_IMAGE_PIXELS} pixels "
                f"({MAX_IMAGE_PIXELS // 1_000_000} megapixels)"
            ) from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{name} is not a recognised image; supported formats: {', '.join(FORMATS)}") from e
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name} cannot be read as an image: {e}") from e

    with image:
        check_size(*image.size, name)  # from the header, before any pixel is decoded
        try:
            image.load()  # PIL decodes lazily; force it so truncation surfaces here
            upright = ImageOps.exif_transpose(image)  # phones store rotation as an EXIF tag
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name} is truncated or corrupt: {e}") from e
        return to_rgb(upright, name)
