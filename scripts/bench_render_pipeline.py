"""Time the rendering pipeline (viewer.render) on a 512x512 CT slice, in process, no HTTP.

    .venv/bin/python scripts/bench_render_pipeline.py [--runs 100] [CT_FILE]

Prints the median and p95 (ms) of: the whole render from a file (read + decode + render + JPEG),
render from an already decoded frame (what a decoded-frame cache gives), the same with a new window
each time (the display table is rebuilt: a "cold window"), and the single steps. Not a test: timings
on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from viewer.render import Window, decode_frame, encode, render_display, render_frame, resize  # noqa: E402
from viewer.render.transforms import grey_transform, to_grey_levels  # noqa: E402

DEFAULT_CT = REPO.parent / "shared" / "testdata" / "ge_ct_phantom_10slices_nometa" / "1998052815582995.ct"


def timed(label: str, runs: int, step: Callable[[int], object]) -> None:
    step(0)  # warm up (imports, first table)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        step(i + 1)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    print(f"{label:<58} median {statistics.median(times):6.2f} ms   p95 {p95:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ct", nargs="?", type=Path, default=DEFAULT_CT)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    data = args.ct.read_bytes()
    ds, frame = decode_frame(data)
    print(f"{args.ct.name}: {frame.pixels.shape[1]}x{frame.pixels.shape[0]} {frame.pixels.dtype}, "
          f"{args.runs} runs, window 40/400, JPEG quality 90")
    window = Window(40, 400)
    timed("render_frame(file bytes): read + decode + render + JPEG", args.runs,
          lambda i: render_frame(data, 0, window, None, "jpeg", 90))
    timed("render_display(decoded frame) -> JPEG, same window", args.runs,
          lambda i: render_display(ds, frame, window, None, "jpeg", 90))
    timed("render_display(decoded frame) -> JPEG, new window each time", args.runs,
          lambda i: render_display(ds, frame, Window(40 + 1000 + i, 400), None, "jpeg", 90))
    timed("render_display -> JPEG 256x256 viewport", args.runs,
          lambda i: render_display(ds, frame, window, "256,256", "jpeg", 90))
    timed("render_display -> PNG", args.runs, lambda i: render_display(ds, frame, window, None, "png", 90))
    timed("render_display -> WebP q90", args.runs, lambda i: render_display(ds, frame, window, None, "webp", 90))
    transform = grey_transform(ds, window)
    shown = to_grey_levels(frame.pixels, transform)
    timed("  step: decode_frame (read + decode)", args.runs, lambda i: decode_frame(data))
    timed("  step: modality + VOI + presentation (cached table)", args.runs,
          lambda i: to_grey_levels(frame.pixels, transform))
    timed("  step: the same computed per pixel (no table)", args.runs, lambda i: transform.apply(frame.pixels))
    timed("  step: JPEG encode", args.runs, lambda i: encode(resize(shown, None), "jpeg", 90))


if __name__ == "__main__":
    main()
