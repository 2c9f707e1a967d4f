"""The last two steps: fit the display image into a viewport, and encode it as JPEG, PNG or WebP.

References
----------
* DICOM PS3.18 §8.3.5.1.2 Viewport (scale to fit, aspect ratio kept; source region),
  §8.3.5.1.4 Quality, §8.3.5.2 rendered media types.
"""

from __future__ import annotations

import enum
import io

import numpy as np
from PIL import Image

from viewer.render.params import RenderError, Viewport


class ImageFormat(enum.Enum):
    """Rendered media types (PS3.18 §8.7.4 Table 8.7.4-1 rendered subset)."""

    JPEG = "image/jpeg"
    PNG = "image/png"
    WEBP = "image/webp"

    @classmethod
    def parse(cls, value: str | ImageFormat) -> ImageFormat:
        """Accept ``jpeg``/``jpg``/``png``/``webp``, their media types, or a member; else ValueError."""
        if isinstance(value, ImageFormat):
            return value
        text = str(value).strip().lower()
        aliases = {"jpeg": cls.JPEG, "jpg": cls.JPEG, "png": cls.PNG, "webp": cls.WEBP}
        if text in aliases:
            return aliases[text]
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"unsupported image format {value!r}: expected jpeg, png or webp") from None

    @property
    def media_type(self) -> str:
        """The media type, e.g. ``image/jpeg``."""
        return self.value


def crop_source(arr: np.ndarray, viewport: Viewport) -> np.ndarray:
    """The viewport's source region ``sx, sy, sw, sh`` of ``arr`` (PS3.18 §8.3.5.1.2).

    A negative ``sw`` (``sh``) takes the ``|sw|`` columns (rows) before ``sx`` (``sy``), i.e.
    ``[sx + sw, sx)``, and flips them.
    """
    rows, cols = arr.shape[:2]
    if viewport.sx >= cols or viewport.sy >= rows:
        raise RenderError(f"viewport source origin {viewport.sx},{viewport.sy} is outside the {cols}x{rows} image")
    xs = _axis_slice(viewport.sx, viewport.sw, cols)
    ys = _axis_slice(viewport.sy, viewport.sh, rows)
    return arr[ys, xs]


def _axis_slice(start: int, length: int | None, size: int) -> slice:
    if length is None:
        return slice(start, size)
    if length > 0:
        return slice(start, min(start + length, size))
    first = max(start + length, 0)  # the region is [start + length, start), read backwards
    return slice(start - 1, first - 1 if first > 0 else None, -1)


def fit_size(width: int, height: int, vw: int, vh: int) -> tuple[int, int]:
    """The largest ``(w, h)`` within ``vw x vh`` with the aspect ratio of ``width x height`` (at least 1x1)."""
    scale = min(vw / width, vh / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(arr: np.ndarray, viewport: Viewport | None) -> Image.Image:
    """uint8 display array → Pillow image, cropped to the source region and scaled into the viewport.

    Downscaling by a whole factor averages areas (``Image.reduce``: 0.2 ms for 512→256); by any
    other factor Lanczos with ``reducing_gap=2`` (Pillow box-reduces by part of the factor first, then
    filters; no visible aliasing). Upscaling: Lanczos. No viewport: the image at its own size.
    """
    if viewport is not None:
        arr = crop_source(arr, viewport)
    image = Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else "RGB")
    if viewport is None:
        return image
    size = fit_size(image.width, image.height, viewport.vw, viewport.vh)
    if size == image.size:
        return image
    factor_x, factor_y = image.width // size[0], image.height // size[1]
    if factor_x > 1 and factor_y > 1 and (image.width, image.height) == (size[0] * factor_x, size[1] * factor_y):
        return image.reduce((factor_x, factor_y))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0 if size[0] < image.width else None)


def encode(image: Image.Image, fmt: ImageFormat | str = ImageFormat.JPEG, quality: int = 90) -> bytes:
    """Encode as JPEG (``quality`` 1–100, 4:2:0 for colour), PNG (zlib level 1: fast, lossless) or
    WebP (``quality`` 1–100 lossy; 100 means lossless)."""
    kind = ImageFormat.parse(fmt)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    out = io.BytesIO()
    if kind is ImageFormat.JPEG:
        image.save(out, format="JPEG", quality=quality)
    elif kind is ImageFormat.PNG:
        image.save(out, format="PNG", compress_level=1)
    else:
        image.save(out, format="WEBP", quality=quality, lossless=quality == 100, method=0)
    return out.getvalue()
