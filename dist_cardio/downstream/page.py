"""Where the ECG grid is on a printout, and cropping or masking everything else (header, footer, margins).

Printout headers carry the patient id, date and heart rate; a classifier can learn those instead of the
ECG (the SimCardioNet paper found one looking at page headers). Fine-tuning can crop or mask the page to
the grid, and the Grad-CAM audit measures how much attention falls outside it.

Detection looks for the grid's long straight lines: pixels darker than the local paper (grid lines of any
colour, and traces) that continue for ~7 mm horizontally or vertically. Text and margins have no such
lines; the grid has them everywhere. The box spans the rows and columns dense in line pixels that lie
near lines of the other direction. Pages without a grid (blank-paper exports) have almost no line pixels:
then the configured `fallback_box` is used.

The filters are numpy (the same windows as `scipy.ndimage`'s, mode `reflect`), so a deployment that
predicts through ONNX Runtime crops pages exactly as training did without installing SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class PageConfig:
    """Crop or mask the printout to its ECG grid before the model sees it."""

    mode: Literal["none", "crop", "mask"] = "none"
    """`crop`: keep only the grid box; `mask`: paint outside it white (page geometry kept); `none`: as is."""
    fallback_box: tuple[float, float, float, float] = (0.034, 0.071, 0.976, 0.976)
    """(left, top, right, bottom) as fractions of the page, used when no grid is found; the default is
    the grid of pages drawn by `dist-cardio render` (render.GRID_BOX_MM on the A4 page)."""
    detect_side: int = 768
    """Long side (px) of the copy the grid is searched on; the grid's 5 mm squares must stay visible."""
    min_density: float = 0.1
    """Share of line pixels inside a found box below which it is not a grid (blank pages, photos)."""

    def __post_init__(self) -> None:
        left, top, right, bottom = self.fallback_box
        if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
            raise ValueError(f"fallback_box must be (left, top, right, bottom) fractions with left < right, top < bottom; got {self.fallback_box}")
        if self.detect_side < 128:
            raise ValueError(f"detect_side must be ≥ 128 px, got {self.detect_side}")
        if not 0.0 < self.min_density < 1.0:
            raise ValueError(f"min_density must be in (0, 1), got {self.min_density}")


class GridBox(NamedTuple):
    """Grid region as fractions of the page (left, top, right, bottom); `detected` False = fallback box."""

    box: tuple[float, float, float, float]
    detected: bool

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixel coordinates of a `width`×`height` image (right/bottom exclusive)."""
        left, top, right, bottom = self.box
        x0, y0 = int(np.floor(left * width)), int(np.floor(top * height))
        x1, y1 = int(np.ceil(right * width)), int(np.ceil(bottom * height))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    def mask(self, height: int, width: int) -> np.ndarray:
        """Boolean [height, width] map, True inside the grid box."""
        x0, y0, x1, y1 = self.pixels(width, height)
        inside = np.zeros((height, width), dtype=bool)
        inside[y0:y1, x0:x1] = True
        return inside


def _along(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _reflect(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`a` padded along `axis` for a `size`-wide window centred as scipy.ndimage centres it (d c b a | a b c d)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (size // 2, size - 1 - size // 2)
    return np.pad(a, pad, mode="symmetric")


def window_mean(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Mean over a `size`-wide window along `axis` (= `scipy.ndimage.uniform_filter1d`), in `a`'s dtype."""
    sums = np.cumsum(_reflect(a, axis, size), axis=axis, dtype=np.float64)
    sums = np.concatenate([np.zeros_like(_along(sums, axis, 0, 1)), sums], axis=axis)
    n = a.shape[axis]
    return ((_along(sums, axis, size, size + n) - _along(sums, axis, 0, n)) / size).astype(a.dtype)


def window_max(a: np.ndarray, size: int) -> np.ndarray:
    """Maximum over a `size`×`size` window (= `scipy.ndimage.maximum_filter`), one axis at a time.

    Window maxima double in width (1, 2, 4, ...) and two overlapping ones cover `size`: log₂(size)
    passes over the page instead of `size`.
    """
    for axis in (0, 1):
        m, n, width = _reflect(a, axis, size), a.shape[axis], 1
        while 2 * width <= size:  # m[i] = max of the padded row from i to i + width
            m = np.maximum(_along(m, axis, 0, m.shape[axis] - width), _along(m, axis, width, m.shape[axis]))
            width *= 2
        a = np.maximum(_along(m, axis, 0, n), _along(m, axis, size - width, size - width + n))
    return a


def _line_pixels(grey_min: np.ndarray, run: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels on faint horizontal / vertical straight lines at least `run` px long.

    Grid lines are lighter than traces and print: a pixel counts when it is darker than the local paper
    but keeps more than 40% of its brightness, so black text, traces and solid marks (a banner in the
    header) never pass for grid.
    """
    paper = window_max(grey_min, 9)
    depth = paper - grey_min
    ink = ((depth > 8.0) & (depth < 0.6 * paper)).astype(np.float32)
    horizontal = window_mean(ink, run, axis=1) > 0.7
    vertical = window_mean(ink, run, axis=0) > 0.7
    return horizontal, vertical


def _box_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a `size`×`size` window (= `scipy.ndimage.uniform_filter`)."""
    return window_mean(window_mean(a, size, axis=0), size, axis=1)


def find_grid(img: Image.Image, cfg: PageConfig) -> GridBox:
    """The ECG grid's box on `img`, or `cfg.fallback_box` when the page shows no grid."""
    scale = min(1.0, cfg.detect_side / max(img.size))
    small = img.convert("RGB")
    if scale < 1.0:
        small = small.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX)
    # The darkest channel: red, pink and grey grid lines all show up in it against white paper.
    grey_min = np.asarray(small, dtype=np.float32).min(axis=2)
    run = max(5, round(cfg.detect_side * 25 / 1024))  # ~7 mm on an A4 page: longer than any letter stroke
    horizontal, vertical = _line_pixels(grey_min, run)
    near_h = _box_mean(horizontal.astype(np.float32), 2 * run) > 0.02
    near_v = _box_mean(vertical.astype(np.float32), 2 * run) > 0.02
    grid = (horizontal & near_v) | (vertical & near_h)
    rows = window_mean(grid.mean(axis=1), run, axis=0)
    cols = window_mean(grid.mean(axis=0), run, axis=0)
    fallback = GridBox(cfg.fallback_box, False)
    if rows.max() <= 0:
        return fallback
    r = np.flatnonzero(rows > 0.25 * rows.max())
    c = np.flatnonzero(cols > 0.25 * cols.max())
    if grid[r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean() < cfg.min_density:
        return fallback
    h, w = grid.shape
    return GridBox((float(c[0] / w), float(r[0] / h), float((c[-1] + 1) / w), float((r[-1] + 1) / h)), True)


def apply_page(img: Image.Image, cfg: PageConfig, grid: GridBox) -> Image.Image:
    """`img` (RGB) cropped to, or masked outside, `grid` per `cfg.mode`."""
    if cfg.mode == "none":
        return img
    box = grid.pixels(img.width, img.height)
    if cfg.mode == "crop":
        return img.crop(box)
    masked = Image.new("RGB", img.size, (255, 255, 255))
    masked.paste(img.crop(box), box[:2])
    return masked


def prepare_page(img: Image.Image, cfg: PageConfig) -> Image.Image:
    """`img` as RGB, cropped to or masked outside its grid per `cfg.mode` (no grid search for `none`)."""
    img = img.convert("RGB")
    return img if cfg.mode == "none" else apply_page(img, cfg, find_grid(img, cfg))


def draw_box(img: Image.Image, grid: GridBox, colour: tuple[int, int, int] = (0, 90, 255)) -> Image.Image:
    """A copy of `img` with the grid box outlined (for the audit overlays)."""
    out = img.convert("RGB")
    ImageDraw.Draw(out).rectangle(
        [v - (1 if i >= 2 else 0) for i, v in enumerate(grid.pixels(out.width, out.height))],
        outline=colour, width=max(2, out.width // 300),
    )
    return out


__all__ = ["PageConfig", "GridBox", "find_grid", "apply_page", "prepare_page", "draw_box"]
