"""Image decoding for `certify` and the server: bytes -> pixels ``[3, S, S]`` float32 in [0, 1].

Conversions (documented for clients), in this order:

1. EXIF orientation is applied, so a phone photo is seen upright, as a viewer shows it.
2. Transparency is composited onto white: an alpha channel (RGBA, LA, PA), a palette's
   transparent entries, and a PNG ``tRNS`` colour key on grayscale, RGB or 16-bit images (the
   pixels equal to the key become white).
3. Bit depth: 8-bit values are divided by 255; 16-bit integer images (PIL modes ``I;16*`` and
   ``I``) by 65535, always, whatever their content, so a dark 16-bit image stays dark (``I``
   values outside [0, 65535] are clipped). Float images (mode ``F``, e.g. float TIFF): values in
   [0, 1] are taken as intensities and multiplied by 255; otherwise values in [0, 255] are taken
   on the 8-bit scale; anything else (negative, above 255, NaN or Inf) is refused, since its
   scale cannot be known. Intensities are then rounded to 8 bits, like every other input.
4. Grayscale, palette and CMYK become RGB; the image is resized to the model's ``S x S`` with
   bilinear filtering (aspect ratio not kept, as in training).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = ["ImageError", "decode_image", "pixels_from_array", "MAX_IMAGE_PIXELS"]

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

MAX_IMAGE_PIXELS = 40_000_000  # a decompression-bomb guard: ~6300 x 6300


class ImageError(ValueError):
    """Input that is not a usable image; the message says what was wrong."""


def decode_image(data: bytes, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into model pixels, refusing bombs and truncated files."""
    from PIL import Image, ImageOps

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
                rgb = _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image refused as a decompression bomb: {err}") from err
    except Exception as err:  # PIL raises many types for bad data
        raise ImageError(f"not a readable image (truncated or not PNG/JPEG?): {err}") from err
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _to_rgb(image):
    """An RGB 8-bit PIL image with the module docstring's transparency and bit-depth rules."""
    from PIL import Image

    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(image)
        values = raw.astype(np.float64).clip(0, 65535) / 65535.0 * 255.0
    elif image.mode == "F":
        raw = np.asarray(image)
        values = _float_intensities(raw)
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        raw = np.asarray(image)
        values = raw.astype(np.float64)
    else:
        return image.convert("RGB")
    key = image.info.get("transparency")
    if key is not None and image.mode != "F":
        keyed = raw == np.asarray(key, dtype=raw.dtype)
        keyed = keyed.all(axis=-1) if raw.ndim == 3 else keyed
        values = np.where(keyed[..., None] if raw.ndim == 3 else keyed, 255.0, values)
    rgb = np.rint(values).astype(np.uint8)
    return Image.fromarray(rgb if rgb.ndim == 3 else np.repeat(rgb[..., None], 3, axis=-1))


def _float_intensities(raw: np.ndarray) -> np.ndarray:
    """Mode ``F`` values on the 8-bit scale: [0, 1] is multiplied by 255, [0, 255] kept, else refused."""
    if not np.isfinite(raw).all():
        raise ImageError("float image contains NaN or Inf")
    low, high = float(raw.min()), float(raw.max())
    if low >= 0 and high <= 1:
        return raw.astype(np.float64) * 255.0
    if low >= 0 and high <= 255:
        return raw.astype(np.float64)
    raise ImageError(f"float image values lie in [{low:.4g}, {high:.4g}]: only [0, 1] (intensities) or [0, 255] "
                     "(8-bit scale) can be read; convert it to 8- or 16-bit")


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
