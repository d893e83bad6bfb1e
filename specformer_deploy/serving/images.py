"""Image decoding for `certify` and the server: bytes -> pixels ``[3, S, S]`` float32 in [0, 1].

Conversions (documented for clients): any PIL-readable format; grayscale, palette, CMYK and
16-bit images are converted to RGB; an alpha channel is composited onto white; the image is
resized to the model's ``S x S`` with bilinear filtering (aspect ratio not kept, as in training).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = ["ImageError", "decode_image", "pixels_from_array", "MAX_IMAGE_PIXELS"]

MAX_IMAGE_PIXELS = 40_000_000  # a decompression-bomb guard: ~6300 x 6300


class ImageError(ValueError):
    """Input that is not a usable image; the message says what was wrong."""


def decode_image(data: bytes, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into model pixels, refusing bombs and truncated files."""
    from PIL import Image

    if not data:
        raise ImageError("empty image: no bytes were sent")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
                probe.verify()  # catches many truncated/corrupt files before decoding
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                rgb = _to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image refused as a decompression bomb: {err}") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise ImageError(f"not a readable image (truncated or not PNG/JPEG?): {err}") from err
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray((array / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def pixels_from_array(values, size: int) -> np.ndarray:
    """Validate client-sent pixels: ``[3, S, S]`` (or ``[S, S]`` / ``[1, S, S]`` grayscale), finite, in [0, 1]."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise ImageError(f"pixels must be a nested list of numbers: {err}") from err
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3) or array.shape[1:] != (size, size):
        raise ImageError(f"pixels must have shape [3, {size}, {size}] (or [{size}, {size}] grayscale), "
                         f"got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ImageError("pixels contain NaN or Inf")
    if array.min() < 0 or array.max() > 1:
        raise ImageError(f"pixels must lie in [0, 1], got values in [{array.min():.4g}, {array.max():.4g}]")
    return np.broadcast_to(array, (3, size, size)).copy()
