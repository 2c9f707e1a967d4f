"""Rendering parameters: the VOI window and the viewport, and parsers for their PS3.18 query forms.

References
----------
* DICOM PS3.18 §8.3.5.1.2 Viewport, §8.3.5.1.3 Windowing (``window=center,width,function``).
* DICOM PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3 (LINEAR_EXACT, SIGMOID).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class RenderError(ValueError):
    """A dataset or a parameter that cannot be rendered; the message says what was wrong."""


class VOIFunction(enum.Enum):
    """VOI LUT Function (0028,1056): how a window maps values to display levels (PS3.3 C.11.2.1.3)."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"

    @classmethod
    def parse(cls, value: str | VOIFunction) -> VOIFunction:
        """Accept ``LINEAR``/``linear``/``linear-exact``/``LINEAR_EXACT``... or a member; else ValueError."""
        if isinstance(value, VOIFunction):
            return value
        name = str(value).strip().upper().replace("-", "_")
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown VOI LUT function {value!r}: expected linear, linear-exact or sigmoid") from None


@dataclass(frozen=True)
class Window:
    """A VOI window: center and width in modality units (e.g. HU), and the VOI LUT function.

    Width must be >= 1 for LINEAR and > 0 for LINEAR_EXACT and SIGMOID (PS3.3 C.11.2.1.2.1, C.11.2.1.3).
    """

    center: float
    width: float
    function: VOIFunction = VOIFunction.LINEAR

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise ValueError(f"window center and width must be finite numbers, got {self.center}, {self.width}")
        if self.function is VOIFunction.LINEAR and self.width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR, got {self.width}")
        if self.width <= 0:
            raise ValueError(f"window width must be > 0 for {self.function.value}, got {self.width}")


def parse_window(text: str) -> Window:
    """Parse the PS3.18 §8.3.5.1.3 ``window`` parameter: ``center,width[,function]``.

    ``function`` is ``linear`` (default), ``linear-exact`` or ``sigmoid`` (any case; ``_`` also accepted).

    Raises
    ------
    ValueError
        With a message naming what was wrong, for anything else.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"window must be 'center,width[,function]', got {text!r}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"window center and width must be numbers, got {text!r}") from None
    function = VOIFunction.parse(parts[2]) if len(parts) == 3 else VOIFunction.LINEAR
    return Window(center, width, function)


@dataclass(frozen=True)
class Viewport:
    """The PS3.18 §8.3.5.1.2 viewport: the output's bounding box and an optional source region.

    ``vw``/``vh`` bound the rendered image (aspect ratio kept). ``sx, sy, sw, sh`` select a region of
    the source image (in source pixels); a negative ``sw`` or ``sh`` flips that axis. ``None`` means the
    whole image.
    """

    vw: int
    vh: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None
    sh: int | None = None

    def __post_init__(self) -> None:
        if self.vw <= 0 or self.vh <= 0:
            raise ValueError(f"viewport width and height must be positive, got {self.vw}x{self.vh}")
        if self.sx < 0 or self.sy < 0:
            raise ValueError(f"viewport source origin must not be negative, got {self.sx},{self.sy}")
        if self.sw == 0 or self.sh == 0:
            raise ValueError("viewport source width and height must not be 0")


def parse_viewport(text: str) -> Viewport:
    """Parse the PS3.18 §8.3.5.1.2 ``viewport`` parameter: ``vw,vh`` or ``vw,vh,sx,sy,sw,sh``.

    In the six-value form ``sx``/``sy`` default to 0 and ``sw``/``sh`` to the rest of the image when
    left empty (``512,512,,,,``).

    Raises
    ------
    ValueError
        With a message naming what was wrong, for anything else.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise ValueError(f"viewport must be 'vw,vh' or 'vw,vh,sx,sy,sw,sh', got {text!r}")
    try:
        values = [int(p) if p else None for p in parts]
    except ValueError:
        raise ValueError(f"viewport values must be integers, got {text!r}") from None
    vw, vh = values[0], values[1]
    if vw is None or vh is None:
        raise ValueError(f"viewport width and height are required, got {text!r}")
    if len(values) == 2:
        return Viewport(vw, vh)
    sx, sy, sw, sh = values[2:]
    return Viewport(vw, vh, sx or 0, sy or 0, sw, sh)
