"""load_image on well-formed and hostile files; every test image is generated here with PIL."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsvl2.errors import ImageError
from dsvl2.inputs import images
from dsvl2.inputs.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, check_size, load_image, to_rgb

GOLDEN_IMAGES = Path(__file__).parent / "fixtures" / "golden" / "images"


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 1-bit PNG that declares width x height but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_png_from_path_and_bytes(tmp_path: Path) -> None:
    image = noise(37, 21)
    path = tmp_path / "a.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes()):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (37, 21)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_golden_rgba_is_plain_convert() -> None:
    # The reference does Image.open(path).convert("RGB"): alpha dropped, colours kept as stored.
    path = GOLDEN_IMAGES / "rgba_500x500.png"
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)


@pytest.mark.parametrize("data", [b"hello, this is not an image\n" * 10, b"\x00" * 100])
def test_not_an_image(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(ImageError, match="not a recognised image"):
            load_image(source)


def test_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_file_over_the_byte_limit_is_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(noise(64, 64), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", len(data) - 1)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("parsed a file over the limit"))
    for source in (data, path):
        with pytest.raises(ImageError, match=f"is {len(data)} bytes, over the limit of {len(data) - 1} bytes"):
            load_image(source)


def test_errors_call_the_image_by_the_given_name(tmp_path: Path) -> None:
    path = tmp_path / "tmpabc.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="^image3 is empty") as refused:
        load_image(path, "image3")
    assert "tmpabc" not in str(refused.value)
    with pytest.raises(ImageError, match=f"^image file '{path}' is empty"):
        load_image(path)
    with pytest.raises(ImageError, match="^image2 is 1x5000, an aspect ratio of 5000:1"):
        load_image(encoded(Image.new("L", (1, 5000)), "PNG"), "image2")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    data = encoded(noise(128, 128), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000), (9000, 8000)])
def test_decompression_bomb_refused_before_decoding(size: tuple[int, int]) -> None:
    # 30000^2 trips PIL's own bomb error, 10000^2 only its warning, 9000x8000 only our limit.
    # The pixel data is nearly absent, so any decoding attempt would report truncation instead.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak to the caller
        with pytest.raises(ImageError, match=f"limit of {MAX_IMAGE_PIXELS}"):
            load_image(png_header_only(*size))


def test_just_under_pixel_limit_is_checked_lazily() -> None:
    # 8000x8000 = 64 MP is exactly the limit: accepted by the size check (decoding then fails
    # because this file has no pixel data, which proves the check itself let it through).
    check_size(8000, 8000)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(png_header_only(8000, 8000))


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    loaded = load_image(data)
    assert loaded.mode == "RGB" and loaded.size == (16, 8)
    assert loaded.getpixel((3, 3)) == (255, 0, 0)


def test_cmyk_jpeg_to_rgb() -> None:
    image = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    image.paste((0, 0, 0, 128), (16, 0, 32, 32))  # right half: 50% black
    loaded = np.asarray(load_image(encoded(image, "JPEG", quality=95))).astype(int)
    assert loaded.shape == (32, 32, 3)
    assert np.abs(loaded[4:28, 2:12] - [255, 0, 0]).max() <= 6
    assert np.abs(loaded[4:28, 20:30] - [127, 127, 127]).max() <= 6


def test_16_bit_png_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 257, 30000, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    loaded = np.asarray(load_image(encoded(image, "PNG")))
    expected = np.round(values / 257).astype(np.uint8)  # 0..65535 -> 0..255
    for channel in range(3):
        assert np.array_equal(loaded[..., channel], expected)


def test_32_bit_int_greyscale_is_rescaled_and_clamped() -> None:
    image = Image.fromarray(np.array([[0, 65535, 70000, -5, 257]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 255, 255, 0, 1]


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    loaded = load_image(encoded(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert loaded.size == (20, 40)
    # Turned clockwise, the left (red) half ends up on top.
    top, bottom = np.asarray(loaded)[5, 10].astype(int), np.asarray(loaded)[35, 10].astype(int)
    assert np.abs(top - [255, 0, 0]).max() <= 8
    assert np.abs(bottom - [0, 0, 255]).max() <= 8


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (200, 10, 20, 0), (200, 10, 20)),
        ("LA", (90, 0), (90, 90, 90)),
    ],
)
def test_transparency_is_dropped(mode: str, colour: tuple, expected: tuple) -> None:
    loaded = load_image(encoded(Image.new(mode, (6, 6), colour), "PNG"))
    assert loaded.mode == "RGB" and loaded.getpixel((2, 2)) == expected


def test_palette_with_transparency() -> None:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    loaded = load_image(encoded(image, "PNG", transparency=1))
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1, MAX_ASPECT_RATIO), (MAX_ASPECT_RATIO, 1)])
def test_tiny_and_thin_images_load(size: tuple[int, int]) -> None:
    assert load_image(encoded(noise(*size), "PNG")).size == size


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (2, 1003)])
def test_too_thin_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ImageError, match=f"limit of {MAX_ASPECT_RATIO}:1"):
        load_image(encoded(Image.new("L", size), "PNG"))


def test_check_size_rejects_empty_images() -> None:
    with pytest.raises(ImageError, match="no pixels"):
        check_size(0, 10)
