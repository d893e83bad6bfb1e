"""Image decoding for `certify` and the server: bytes -> the model's pixels ``[C, S, S]`` in [0, 1].

Reading (per pixel, before anything is mixed), in this order:

1. EXIF orientation is applied, so a phone photo is seen upright, as a viewer shows it.
2. The sent image is grey (modes ``1``, ``L``, ``LA``, ``I;16*``, ``I``, ``F``) or colour (every other
   mode becomes RGB, palettes and CMYK through PIL's own conversion).
3. Bit depth: 8-bit values are divided by 255; 16-bit integer images (PIL modes ``I;16*`` and
   ``I``) by 65535, always, whatever their content, so a dark 16-bit image stays dark (``I``
   values outside [0, 65535] are clipped). Float images (mode ``F``, e.g. float TIFF): values in
   [0, 1] are taken as intensities; otherwise values in [0, 255] are taken on the 8-bit scale and
   divided by 255; anything else (negative, above 255, NaN or Inf) is refused, since its scale
   cannot be known. Nothing is rounded.
4. Transparency is composited onto white: an alpha channel (RGBA, LA, PA), a palette's
   transparent entries, and a PNG ``tRNS`` colour key on grayscale, RGB or 16-bit images (the
   pixels equal to the key become white). With the alpha held fixed, compositing moves a pixel
   by ``alpha <= 1`` times what its colour moved, so it never enlarges a perturbation.

Then :class:`~specformer_deploy.serving.decode.DecodeMap`: one linear float32 map to the model's
channels and ``S x S`` grid (antialiased bilinear, aspect ratio not kept, as in training), whose
exact norm turns a radius in the model grid into one in the sent image (``radius / ||A||_2``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from specformer_deploy.serving.decode import DecodeMap, SentImage

__all__ = ["ImageError", "DecodedImage", "read_image", "decode_image", "pixels_from_array", "read_pixels",
           "MAX_IMAGE_PIXELS"]

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
GREY_MODES = ("1", "L", "LA", "La", "F", *SIXTEEN_BIT_MODES)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

MAX_IMAGE_PIXELS = 40_000_000  # a decompression-bomb guard: ~6300 x 6300


class ImageError(ValueError):
    """Input that is not a usable image; the message says what was wrong."""


@dataclass(frozen=True)
class DecodedImage:
    """The model's input for one sent image, and the linear map that produced it."""

    pixels: np.ndarray  # [C, S, S] float32, the model's channels and grid
    decode: DecodeMap  # sent image ([c, h, w] in [0, 1]) -> pixels

    @property
    def sent(self) -> SentImage:
        return self.decode.sent


def read_image(data: bytes, size: int, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode PNG/JPEG/... bytes into a ``channels``-channel model's pixels, refusing bombs and
    truncated files; the result carries the sent image's shape and the decode map."""
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
                values = sent_values(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image refused as a decompression bomb: {err}") from err
    except Exception as err:  # PIL raises many types for bad data
        raise ImageError(f"not a readable image (truncated or not PNG/JPEG?): {err}") from err
    decode = DecodeMap(SentImage(*values.shape), (channels, size, size))
    return DecodedImage(decode.apply(values), decode)


def decode_image(data: bytes, size: int, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """:func:`read_image`'s pixels alone (``[channels, size, size]``)."""
    return read_image(data, size, channels, max_pixels).pixels


def sent_values(image) -> np.ndarray:
    """The sent image's values as float32 ``[1 or 3, H, W]`` in [0, 1] (module docstring, steps 2-4)."""
    grey = image.mode in GREY_MODES or (image.mode == "P" and _palette_is_grey(image))
    alpha = None
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., -1:]
        values = rgba[..., :-1]
    elif image.mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(image)
        values = (raw.astype(np.float64).clip(0, 65535) / 65535.0)[..., None]
    elif image.mode == "F":
        values = _float_intensities(np.asarray(image))[..., None]
    elif grey:
        raw = np.asarray(image.convert("L"))
        values = (raw.astype(np.float64) / 255.0)[..., None]
    else:
        raw = np.asarray(image.convert("RGB"))
        values = raw.astype(np.float64) / 255.0
    key = image.info.get("transparency")
    if alpha is None and key is not None and image.mode in ("L", "RGB", *SIXTEEN_BIT_MODES):
        keyed = np.asarray(image) == np.asarray(key, dtype=np.asarray(image).dtype)
        keyed = keyed.all(axis=-1) if keyed.ndim == 3 else keyed
        alpha = (~keyed).astype(np.float32)[..., None]
    if alpha is not None:
        values = values * alpha + (1.0 - alpha)
    return np.ascontiguousarray(np.moveaxis(np.asarray(values, dtype=np.float32), -1, 0))


def _palette_is_grey(image) -> bool:
    """A palette whose used entries all have R = G = B is a grey image."""
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _float_intensities(raw: np.ndarray) -> np.ndarray:
    """Mode ``F`` values as intensities in [0, 1]: [0, 1] kept, [0, 255] divided by 255, else refused."""
    if not np.isfinite(raw).all():
        raise ImageError("float image contains NaN or Inf")
    low, high = float(raw.min()), float(raw.max())
    if low >= 0 and high <= 1:
        return raw.astype(np.float64)
    if low >= 0 and high <= 255:
        return raw.astype(np.float64) / 255.0
    raise ImageError(f"float image values lie in [{low:.4g}, {high:.4g}]: only [0, 1] (intensities) or [0, 255] "
                     "(8-bit scale) can be read; convert it to 8- or 16-bit")


def read_pixels(values, size: int, channels: int = 3) -> DecodedImage:
    """Client-sent pixels in the model's grid: ``[c, S, S]`` (or ``[S, S]`` grey) with ``c`` 1 or 3,
    finite, in [0, 1]; converted to the model's ``channels`` by the same channel map as images."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise ImageError(f"pixels must be a nested list of numbers: {err}") from err
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3) or array.shape[1:] != (size, size):
        raise ImageError(f"pixels must have shape [{channels}, {size}, {size}] (or [1 or 3, {size}, {size}], or "
                         f"[{size}, {size}] grey), got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ImageError("pixels contain NaN or Inf")
    if array.min() < 0 or array.max() > 1:
        raise ImageError(f"pixels must lie in [0, 1], got values in [{array.min():.4g}, {array.max():.4g}]")
    decode = DecodeMap(SentImage(*array.shape), (channels, size, size))
    return DecodedImage(decode.apply(array), decode)


def pixels_from_array(values, size: int, channels: int = 3) -> np.ndarray:
    """:func:`read_pixels`'s pixels alone."""
    return read_pixels(values, size, channels).pixels
