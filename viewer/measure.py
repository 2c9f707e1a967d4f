"""Region statistics for the viewer's ROI tool: pure numpy, no HTTP (DESIGN.md).

The ellipse is given by the corners of its bounding box in image pixel coordinates (column, row),
as the viewer's annotations are: a pixel belongs to it when its centre lies inside. Pixel ``(c, r)``
covers ``[c, c+1) x [r, r+1)``, so its centre is ``(c + 0.5, r + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RegionStats:
    pixels: int
    mean: float
    sd: float  # population standard deviation of the pixels inside
    minimum: float
    maximum: float


def ellipse_mask(shape: tuple[int, int], x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Boolean (rows, columns) mask of the pixels whose centres lie inside the ellipse in the box."""
    rows, cols = shape
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    rx, ry = abs(x1 - x0) / 2.0, abs(y1 - y0) / 2.0
    if rx <= 0 or ry <= 0:
        return np.zeros(shape, dtype=bool)
    ys = (np.arange(rows, dtype=np.float64) + 0.5)[:, None]
    xs = (np.arange(cols, dtype=np.float64) + 0.5)[None, :]
    inside: np.ndarray = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    return inside


def region_stats(values: np.ndarray, mask: np.ndarray) -> RegionStats | None:
    """Statistics of ``values`` (modality values, 2-D) where ``mask`` is set; None for an empty region."""
    inside = values[mask].astype(np.float64)
    if inside.size == 0:
        return None
    return RegionStats(int(inside.size), float(inside.mean()), float(inside.std()), float(inside.min()),
                       float(inside.max()))


__all__ = ["RegionStats", "ellipse_mask", "region_stats"]
