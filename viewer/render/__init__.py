"""The rendering pipeline: pure numpy + Pillow functions, no HTTP (DESIGN.md).

``decode → modality LUT → VOI (window or VOI LUT) → presentation (MONOCHROME1 inversion) → resize →
encode``, one function per step:

* :func:`viewer.render.decode.decode_frame` (and ``mask_bits_stored``),
* :mod:`viewer.render.transforms` (``apply_modality_lut``, ``apply_window``,
  ``apply_voi_lut_sequence``, ``invert_monochrome1``, ``ybr_to_rgb``, ``apply_palette``; composed by
  ``to_display``),
* :mod:`viewer.render.output` (``resize``, ``encode``),

and :func:`render_frame` running them all. Parameter parsers for the PS3.18 query forms:
:func:`parse_window`, :func:`parse_viewport`.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from viewer.render.decode import (Frame, Source, decode_frame, detach_for_cache, load_dataset, mask_bits_stored,
                                  number_of_frames)
from viewer.render.output import ImageFormat, encode, resize
from viewer.render.params import RenderError, Viewport, VOIFunction, Window, parse_viewport, parse_window
from viewer.render.transforms import to_display

__all__ = [
    "Frame", "ImageFormat", "RenderError", "Source", "VOIFunction", "Viewport", "Window",
    "decode_frame", "detach_for_cache", "encode", "load_dataset", "mask_bits_stored", "number_of_frames", "parse_viewport",
    "parse_window", "render_display", "render_frame", "resize", "to_display",
]


def render_display(ds: Dataset, frame: Frame, window: Window | str | None = None,
                   viewport: Viewport | str | None = None, fmt: ImageFormat | str = ImageFormat.JPEG,
                   quality: int = 90) -> bytes:
    """Render an already decoded frame (e.g. from a decoded-frame cache): to_display → resize → encode."""
    if isinstance(window, str):
        window = parse_window(window)
    if isinstance(viewport, str):
        viewport = parse_viewport(viewport)
    display = to_display(frame.pixels, ds, window, frame.photometric)
    return encode(resize(display, viewport), fmt, quality)


def render_frame(src: Source, frame: int = 0, window: Window | str | None = None,
                 viewport: Viewport | str | None = None, fmt: ImageFormat | str = ImageFormat.JPEG,
                 quality: int = 90) -> bytes:
    """Render frame ``frame`` (0-based) of a dataset, a path or Part 10 bytes as JPEG, PNG or WebP.

    Order: decode → modality LUT → VOI → presentation → resize → encode. ``window`` (a
    :class:`Window` or the PS3.18 string ``center,width[,function]``) overrides the instance's window;
    ``viewport`` (a :class:`Viewport` or ``vw,vh[,sx,sy,sw,sh]``) bounds the output, aspect ratio kept.

    Raises
    ------
    RenderError
        Input that cannot be rendered (a subclass of ValueError; the message says why).
    ValueError
        A malformed ``window``, ``viewport``, ``fmt`` or ``quality``.
    """
    if isinstance(window, str):
        window = parse_window(window)
    if isinstance(viewport, str):
        viewport = parse_viewport(viewport)
    fmt = ImageFormat.parse(fmt)
    ds, decoded = decode_frame(src, frame)
    return render_display(ds, decoded, window, viewport, fmt, quality)
