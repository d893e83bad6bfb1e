"""Image decoding gives the pixels a viewer shows: orientation, transparency and bit depth.

Each case builds an image with numpy and PIL, encodes it, decodes it with ``decode_image`` and
compares with pixels computed here by hand (8-bit rounding: ``rint(v * 255 / full_scale) / 255``).
Images are decoded at their own size, so no resampling is involved.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from specformer_deploy.serving.images import ImageError, decode_image

SIZE = 6


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rgb_planes(hwc: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` 8-bit values -> ``[3, H, W]`` pixels in [0, 1]."""
    return hwc.astype(np.float32).transpose(2, 0, 1) / 255.0


def _gray_planes(hw: np.ndarray) -> np.ndarray:
    return np.repeat((hw.astype(np.float32) / 255.0)[None], 3, axis=0)


def _distinct_rgb() -> np.ndarray:
    """Every pixel different, so any rotation or flip changes the array."""
    values = np.arange(SIZE * SIZE * 3, dtype=np.int64).reshape(SIZE, SIZE, 3) * 2
    return values.astype(np.uint8)


# EXIF orientation tag -> what a viewer does to the stored pixels (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    2: lambda a: a[:, ::-1],                 # mirror left-right
    3: lambda a: a[::-1, ::-1],              # rotate 180
    4: lambda a: a[::-1, :],                 # mirror top-bottom
    5: lambda a: a.transpose(1, 0, 2),       # transpose (mirror about the main diagonal)
    6: lambda a: a[::-1].transpose(1, 0, 2),  # rotate 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),  # rotate 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    stored = _distinct_rgb()
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    expected = _rgb_planes(np.ascontiguousarray(ORIENTATIONS[orientation](stored)))
    np.testing.assert_array_equal(decode_image(_encode(image, exif=exif), SIZE), expected)


def test_exif_orientation_1_and_no_exif_keep_the_stored_pixels() -> None:
    stored = _distinct_rgb()
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 1
    np.testing.assert_array_equal(decode_image(_encode(image, exif=exif), SIZE), _rgb_planes(stored))
    np.testing.assert_array_equal(decode_image(_encode(image), SIZE), _rgb_planes(stored))


def test_rotated_photo_is_upright_after_resizing_too() -> None:
    """A tall photo stored sideways (orientation 6): the top row a viewer sees is the stored left column."""
    stored = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    stored[:, :SIZE // 2] = 255  # left part of the stored (landscape) image is white
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    pixels = decode_image(_encode(image, exif=exif), SIZE)
    assert pixels[:, 0].min() == 1.0 and pixels[:, -1].max() == 0.0  # white on top, black at the bottom


def test_grayscale_trns_key_is_composited_on_white() -> None:
    gray = np.array([[7, 50, 200, 7, 0, 255]] * SIZE, np.uint8)
    expected = np.where(gray == 7, 255, gray)
    data = _encode(Image.fromarray(gray), transparency=7)
    np.testing.assert_array_equal(decode_image(data, SIZE), _gray_planes(expected))


def test_rgb_trns_key_is_composited_on_white() -> None:
    rgb = _distinct_rgb()
    key = (10, 20, 30)
    rgb[1, 2] = key
    rgb[4, 0] = key
    rgb[3, 3] = (10, 20, 31)  # one channel away from the key: stays opaque
    expected = rgb.copy()
    expected[1, 2] = expected[4, 0] = 255
    data = _encode(Image.fromarray(rgb), transparency=key)
    np.testing.assert_array_equal(decode_image(data, SIZE), _rgb_planes(expected))


def test_sixteen_bit_trns_key_is_composited_on_white() -> None:
    values = np.full((SIZE, SIZE), 30000, np.uint16)
    values[2, 2] = 400
    expected = np.full((SIZE, SIZE), 30000 * 255 / 65535)
    expected[2, 2] = 255
    data = _encode(Image.fromarray(values), transparency=400)
    np.testing.assert_allclose(decode_image(data, SIZE), _gray_planes(expected), rtol=1e-6)


def test_palette_transparency_and_alpha_are_composited_on_white() -> None:
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, :, 3] = 0  # first row fully transparent
    expected = np.zeros((SIZE, SIZE, 3), np.uint8)
    expected[..., 0] = 200
    expected[0] = 255
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgba)), SIZE), _rgb_planes(expected))
    palette = Image.fromarray(rgba).convert("P")
    index = palette.getpixel((0, 0))
    data = _encode(palette, transparency=index)
    np.testing.assert_array_equal(decode_image(data, SIZE), _rgb_planes(expected))


@pytest.mark.parametrize("brightest", [255, 256, 65535])
def test_sixteen_bit_is_always_scaled_by_65535(brightest: int) -> None:
    """The decoded value of a pixel depends on that pixel alone, not on the image's maximum."""
    values = np.array([[0, 1, 128, 129, 200, 255]] * SIZE, np.uint16)
    values[-1, -1] = brightest
    expected = values.astype(np.float64) * 255 / 65535
    decoded = decode_image(_encode(Image.fromarray(values)), SIZE)
    np.testing.assert_allclose(decoded, _gray_planes(expected), rtol=1e-6)
    assert decoded[0, 0, :5].max() <= 1 / 255  # a dark 16-bit image stays dark


def test_dark_16bit_image_is_not_stretched() -> None:
    values = np.linspace(0, 4000, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    decoded = decode_image(_encode(Image.fromarray(values)), SIZE)
    np.testing.assert_allclose(decoded, _gray_planes(values * 255.0 / 65535), rtol=1e-6)
    assert decoded.max() == pytest.approx(4000 / 65535)


def test_float_tiff_in_unit_range_is_scaled_by_255() -> None:
    values = np.linspace(0.0, 1.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    decoded = decode_image(_encode(Image.fromarray(values), "TIFF"), SIZE)
    np.testing.assert_allclose(decoded, _gray_planes(values.astype(np.float64) * 255), rtol=1e-6)
    assert decoded.max() == 1.0 and decoded[0, 0, 1] > 0


def test_float_tiff_on_the_8_bit_scale_is_kept() -> None:
    values = np.linspace(0.0, 255.0, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    decoded = decode_image(_encode(Image.fromarray(values), "TIFF"), SIZE)
    np.testing.assert_allclose(decoded, _gray_planes(values.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("bad, message", [(-0.5, r"values lie in \[-0.5"), (300.0, "only \\[0, 1\\]"),
                                          (np.nan, "NaN or Inf"), (np.inf, "NaN or Inf")])
def test_float_tiff_of_unknown_scale_is_refused(bad: float, message: str) -> None:
    values = np.full((SIZE, SIZE), 0.5, np.float32)
    values[1, 1] = bad
    with pytest.raises(ImageError, match=message):
        decode_image(_encode(Image.fromarray(values), "TIFF"), SIZE)


def test_32_bit_integer_tiff_is_read_on_the_16_bit_scale() -> None:
    values = np.array([[0, 255, 32768, 65535, 70000, 3]] * SIZE, np.int32)
    decoded = decode_image(_encode(Image.fromarray(values), "TIFF"), SIZE)
    expected = np.clip(values, 0, 65535) * 255.0 / 65535
    np.testing.assert_allclose(decoded, _gray_planes(expected), rtol=1e-6)


def test_plain_8_bit_images_are_unchanged() -> None:
    rgb = _distinct_rgb()
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgb)), SIZE), _rgb_planes(rgb))
    gray = rgb[..., 0]
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(gray)), SIZE), _gray_planes(gray))
