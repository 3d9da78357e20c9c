"""Rasterise 12-lead signals into paper-like ECG printouts, and render whole datasets in parallel.

Hospitals hold signals; SimCardioNet reads images. A page is A4 landscape at 25 mm/s and 10 mm/mV on a
millimetre grid: a 3×4 block (columns I-III, aVR-aVF, V1-V3, V4-V6, each showing its own 2.5 s window),
a 10 s lead II rhythm strip, 1 mV calibration pulses and an optional header line. Drawing uses PIL
polylines on a grid pre-rendered once per (dpi, colour), not matplotlib, so thousands of pages are cheap.
An image depends only on (record, config, seed), never on the worker that drew it.
"""

from __future__ import annotations

import csv
import functools
import logging
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from dist_cardio.signals.records import LEADS, SUPERCLASSES, RecordError, RecordRef, list_records, load_record

log = logging.getLogger(__name__)

PAGE_MM = (297.0, 210.0)
SPEED_MM_S = 25.0
GAIN_MM_MV = 10.0
HEADER_MM = 15.0
"""Height of the header band at the top of the page; the grid and traces start below it."""
GRID_BOX_MM = (10.0, HEADER_MM, 290.0, 205.0)
"""Grid area (x0, y0, x1, y1) in mm from the page's top-left corner; whole millimetres so lines fall on mm."""
TRACE_X0_MM = 20.0
"""Where t = 0 of every row is drawn; the calibration pulse sits just left of it."""
CAL_X_MM = (13.0, 14.0, 19.0, 20.0)
"""Calibration pulse: baseline from x0 to x1, up 1 mV, flat to x2 (0.2 s wide), down, baseline to x3."""
ROW_BASELINES_MM = (40.0, 85.0, 130.0, 175.0)
"""0 mV line of the three lead rows and the rhythm strip."""
COLUMN_S = 2.5
RHYTHM_S = 10.0
RHYTHM_LEAD = "II"
LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
"""LAYOUT[row][column]: column c shows seconds [2.5c, 2.5c + 2.5) of its leads."""

GRID_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]] = {
    # (paper, minor 1 mm lines, major 5 mm lines)
    "red": ((255, 255, 255), (248, 196, 196), (232, 120, 120)),
    "pink": ((255, 247, 249), (250, 218, 228), (240, 160, 185)),
    "grey": ((255, 255, 255), (222, 222, 222), (165, 165, 165)),
    "none": ((255, 255, 255), (255, 255, 255), (255, 255, 255)),
}
INK = (0, 0, 0)
PAPER, MINOR, MAJOR, INK_INDEX = range(4)
"""Palette indices: pages are drawn in PIL mode "P" (one byte a pixel), which draws and encodes ~3× faster."""
PNG_COMPRESS_LEVEL = 3
"""zlib level for PNG: PIL's default 6 takes ~2× as long for files ~1/4 smaller (25 vs 33 KB a palette page)."""

VARY_DPI_FACTORS = (0.75, 1.0, 1.25)
VARY_GRIDS = (("red", 0.4), ("pink", 0.3), ("grey", 0.2), ("none", 0.1))
VARY_LINE_WIDTH_FACTORS = (0.6, 1.6)
VARY_ROTATION_DEG = 3.0
VARY_NOISE = (0.0, 12.0)
VARY_BLUR = (0.0, 1.2)
VARY_JPEG_QUALITY = (60, 95)
VARY_HEADER_P = 0.5

LABEL_COLUMNS = ("path", "label", "strat_fold", "ecg_id", "patient")


@dataclass(frozen=True)
class RenderConfig:
    """How one printout looks; `--vary` samples a variant of it per image for robustness."""

    dpi: int = 200
    """Pixels per inch; A4 landscape at 200 dpi is 2339×1654 px, like real ~2200×1600 scans."""
    grid: Literal["red", "pink", "grey", "none"] = "red"
    """Grid paper colour; "none" is a blank page (some exports have no grid)."""
    line_width: float = 0.3
    """Trace width in mm (at least one pixel)."""
    rotation: float = 0.0
    """Page rotation in degrees (a skewed scan); positive is counter-clockwise."""
    noise: float = 0.0
    """Standard deviation of Gaussian scan noise, in 8-bit grey levels."""
    blur: float = 0.0
    """Blur radius in pixels (scanner optics); fractions allowed."""
    header: bool = True
    """Draw the header line (record id, speed, gain, rate); it is a known classifier shortcut."""
    format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = 90
    """JPEG quality for format "jpg" (1-95)."""

    def __post_init__(self) -> None:
        if not 50 <= self.dpi <= 600:
            raise ValueError(f"dpi must be in 50..600, got {self.dpi}")
        if self.grid not in GRID_COLOURS:
            raise ValueError(f"grid must be one of {', '.join(GRID_COLOURS)}, got {self.grid!r}")
        if not 0.05 <= self.line_width <= 2.0:
            raise ValueError(f"line_width must be in 0.05..2.0 mm, got {self.line_width}")
        if not -10.0 <= self.rotation <= 10.0:
            raise ValueError(f"rotation must be within ±10 degrees, got {self.rotation}")
        if not 0.0 <= self.noise <= 64.0:
            raise ValueError(f"noise must be in 0..64 grey levels, got {self.noise}")
        if not 0.0 <= self.blur <= 5.0:
            raise ValueError(f"blur must be in 0..5 px, got {self.blur}")
        if self.format not in ("png", "jpg"):
            raise ValueError(f"format must be png or jpg, got {self.format!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")

    @property
    def px_per_mm(self) -> float:
        return self.dpi / 25.4

    @property
    def size(self) -> tuple[int, int]:
        """Page (width, height) in pixels."""
        return round(PAGE_MM[0] * self.px_per_mm), round(PAGE_MM[1] * self.px_per_mm)


def vary_config(cfg: RenderConfig, rng: np.random.Generator) -> RenderConfig:
    """A variant of `cfg` for augmentation: dpi, grid, line width, rotation, noise, blur, header, JPEG quality.

    dpi comes from a few factors of `cfg.dpi` so the per-(dpi, colour) grid cache stays small; a header
    switched off in `cfg` stays off (it is a shortcut), one switched on is kept on half the time.
    """
    dpi = int(np.clip(round(cfg.dpi * rng.choice(VARY_DPI_FACTORS)), 50, 600))
    grids, weights = zip(*VARY_GRIDS)
    return replace(
        cfg,
        dpi=dpi,
        grid=str(rng.choice(grids, p=weights)),
        line_width=float(np.clip(cfg.line_width * rng.uniform(*VARY_LINE_WIDTH_FACTORS), 0.05, 2.0)),
        rotation=float(rng.uniform(-VARY_ROTATION_DEG, VARY_ROTATION_DEG)),
        noise=float(rng.uniform(*VARY_NOISE)),
        blur=float(rng.uniform(*VARY_BLUR)),
        header=cfg.header and bool(rng.random() < VARY_HEADER_P),
        jpeg_quality=int(rng.integers(VARY_JPEG_QUALITY[0], VARY_JPEG_QUALITY[1] + 1)),
    )


def header_text(name: str, fs: float) -> str:
    """The header line: record id, paper speed, gain and sampling rate (never patient data)."""
    return f"{name}    {SPEED_MM_S:g} mm/s    {GAIN_MM_MV:g} mm/mV    {fs:g} Hz"


def render_printout(signal_mv: np.ndarray, fs: float, cfg: RenderConfig, header: str | None,
                    rng: np.random.Generator) -> Image.Image:
    """Draw one page from `signal_mv` [T, 12] (mV, `LEADS` order); `rng` drives the scan noise only.

    Returns a 4-colour palette image (mode "P": small, fast PNGs that decoders expand to RGB) when the
    config has no rotation, blur or noise, else an RGB image. Each lead's median is removed first, like
    an ECG cart's baseline filter, so a DC offset does not push a trace into its neighbours. The first
    10 s are drawn; a shorter record leaves the rest blank.
    """
    if signal_mv.ndim != 2 or signal_mv.shape[1] != len(LEADS):
        raise ValueError(f"signal_mv must be [T, {len(LEADS)}], got shape {signal_mv.shape}")
    k = cfg.px_per_mm
    img = _grid_page(cfg.dpi, cfg.grid).copy()
    draw = ImageDraw.Draw(img)
    width = max(1, round(cfg.line_width * k))
    signal = signal_mv[: int(round(RHYTHM_S * fs))].astype(np.float32)
    signal = signal - np.median(signal, axis=0)
    label_font = _font(max(6, round(4.0 * k)))

    def trace(lead: str, baseline: float, n0: int, n1: int) -> None:
        v = signal[n0:n1, LEADS.index(lead)]
        if len(v) < 2:
            return
        x = (TRACE_X0_MM + np.arange(n0, n0 + len(v)) / fs * SPEED_MM_S) * k
        y = np.clip((baseline - v * GAIN_MM_MV) * k, 0, img.height - 1)
        # Rounded here because PIL truncates float coordinates, which would shift every trace up-left.
        draw.line(np.rint(np.column_stack([x, y])).ravel().tolist(), fill=INK_INDEX, width=width)

    for row, baseline in enumerate(ROW_BASELINES_MM):
        x0, x1, x2, x3 = CAL_X_MM
        top = baseline - 1.0 * GAIN_MM_MV
        pulse = [(x0, baseline), (x1, baseline), (x1, top), (x2, top), (x2, baseline), (x3, baseline)]
        draw.line([(round(x * k), round(y * k)) for x, y in pulse], fill=INK_INDEX, width=width)
        leads = LAYOUT[row] if row < len(LAYOUT) else (RHYTHM_LEAD,)
        for col, lead in enumerate(leads):
            t0 = col * COLUMN_S
            n0, n1 = (0, len(signal)) if row == len(LAYOUT) else (round(t0 * fs), round((t0 + COLUMN_S) * fs))
            trace(lead, baseline, n0, min(n1, len(signal)))
            x_label = TRACE_X0_MM + t0 * SPEED_MM_S + 1.0
            draw.text((x_label * k, (baseline - 16.0) * k), lead, fill=INK_INDEX, font=label_font)
            if col > 0:  # separator tick where one column's window ends and the next begins
                xs = round((TRACE_X0_MM + t0 * SPEED_MM_S) * k)
                tick = [(xs, round((baseline - 3.0) * k)), (xs, round((baseline + 3.0) * k))]
                draw.line(tick, fill=INK_INDEX, width=width)
    if cfg.header and header is not None:
        draw.text((GRID_BOX_MM[0] * k, 5.0 * k), header, fill=INK_INDEX, font=_font(max(6, round(4.0 * k))))
    return _scan_effects(img, cfg, rng)


def _scan_effects(img: Image.Image, cfg: RenderConfig, rng: np.random.Generator) -> Image.Image:
    """Rotation, blur and noise in the order a scanner applies them (skewed page, optics, sensor)."""
    if not (cfg.rotation or cfg.blur or cfg.noise):
        return img
    img = img.convert("RGB")
    if cfg.rotation:
        paper = GRID_COLOURS[cfg.grid][0]
        img = img.rotate(cfg.rotation, resample=Image.Resampling.BILINEAR, fillcolor=paper)
    if cfg.blur > 0:
        # A box blur looks the same as a Gaussian at these radii and costs half as much in PIL.
        img = img.filter(ImageFilter.BoxBlur(cfg.blur))
    if cfg.noise > 0:
        # Gaussian noise through a 256-entry quantile table: uint8 draws + a lookup are ~10× cheaper than
        # float normals on a 4-megapixel page. One field for all channels: scanner noise is mostly luminance.
        table = np.clip(np.round(128 + cfg.noise * _NORMAL_QUANTILES), 0, 255).astype(np.uint8)
        field = Image.fromarray(table[rng.integers(0, 256, (img.height, img.width), dtype=np.uint8)], "L")
        img = ImageChops.add(img, field.convert("RGB"), scale=1.0, offset=-128)
    return img


_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])


@functools.lru_cache(maxsize=12)
def _grid_page(dpi: int, grid: str) -> Image.Image:
    """The blank palette page with its grid, drawn once per (dpi, colour); callers must `.copy()` it."""
    k = dpi / 25.4
    width, height = round(PAGE_MM[0] * k), round(PAGE_MM[1] * k)
    page = np.full((height, width), PAPER, np.uint8)
    if grid != "none":
        x0, y0, x1, y1 = GRID_BOX_MM
        px = [round(x0 * k), round(x1 * k) + 1]
        py = [round(y0 * k), round(y1 * k) + 1]
        major_w = max(1, round(0.15 * k))
        for step, colour, w in ((1, MINOR, 1), (5, MAJOR, major_w)):
            for mm in np.arange(x0, x1 + 0.5, step):
                c = round(mm * k)
                page[py[0]:py[1], c:c + w] = colour
            for mm in np.arange(y0, y1 + 0.5, step):
                r = round(mm * k)
                page[r:r + w, px[0]:px[1]] = colour
    img = Image.frombytes("P", (width, height), page.tobytes())
    img.putpalette([channel for colour in (*GRID_COLOURS[grid], INK) for channel in colour])
    return img


@functools.lru_cache(maxsize=8)
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)


def record_rng(seed: int, name: str) -> np.random.Generator:
    """Per-record generator: the same image whatever the worker count, order or `--limit`."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def save_atomic(img: Image.Image, target: Path, cfg: RenderConfig) -> None:
    """Write under a temporary name, then rename: an interrupted run never leaves a half image."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        if cfg.format == "jpg":
            img.convert("RGB").save(tmp, format="JPEG", quality=cfg.jpeg_quality)
        else:
            img.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _render_one(task: tuple[RecordRef, str, RenderConfig, bool, int]) -> str | None:
    """Worker: read, draw, save one record; returns a warning naming the file, or None when written."""
    ref, target, cfg, vary, seed = task
    try:
        record = load_record(ref)
    except RecordError as e:
        return str(e)
    rng = record_rng(seed, ref.name)
    page_cfg = vary_config(cfg, rng) if vary else cfg
    img = render_printout(record.signal_mv, record.fs, page_cfg, header_text(record.name, record.fs), rng)
    save_atomic(img, Path(target), page_cfg)
    return None


def render_dataset(input: Path, out: Path, cfg: RenderConfig, workers: int = 1, limit: int | None = None,
                   vary: bool = False, seed: int = 0, *, rate: int = 100,
                   exclude_ids: frozenset[int] = frozenset()) -> dict:
    """Render INPUT into `out/images/` and write `out/labels.csv`; returns written/skipped/failed/seconds.

    Images already in `out` are kept and skipped (re-running resumes); unreadable records are skipped with
    a one-line warning naming the file; labels.csv is rewritten atomically, keeping rows of earlier runs
    whose images still exist.
    """
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be ≥ 0, got {limit}")
    start = time.perf_counter()
    refs = list_records(input, rate, exclude_ids)[:limit]
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob("*.tmp-*"):  # left by a run that was killed mid-write
        stale.unlink()
    targets = {ref.name: images / f"{ref.name}.{cfg.format}" for ref in refs}
    todo = [(ref, str(targets[ref.name]), cfg, vary, seed) for ref in refs if not targets[ref.name].exists()]
    failed = 0
    try:
        with tqdm(total=len(todo), desc="render", unit="img", disable=not todo) as bar:
            for warning in _run_tasks(todo, workers):
                if warning is not None:
                    failed += 1
                    log.warning("skipped %s", warning)
                bar.update()
    finally:  # also after an interrupt: labels.csv then lists the images that made it to disk
        write_labels(out, [ref for ref in refs if targets[ref.name].exists()], cfg.format)
    return {
        "written": len(todo) - failed,
        "skipped": len(refs) - len(todo),
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }


def _run_tasks(todo: list[tuple[RecordRef, str, RenderConfig, bool, int]], workers: int) -> Iterator[str | None]:
    """Results of `_render_one` in completion order; in this process for one worker, else a chunked pool."""
    if workers == 1 or len(todo) <= 1:
        yield from map(_render_one, todo)
        return
    chunk = max(1, min(16, len(todo) // (workers * 8)))
    # Not fork: the parent may hold threads (tqdm's monitor), and fork with threads can deadlock. A fork
    # server that has imported this module once starts workers much faster than spawn, which re-imports.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap_unordered(_render_one, todo, chunksize=chunk)


def write_labels(out: Path, refs: list[RecordRef], fmt: str) -> Path:
    """`out/labels.csv` (path,label,strat_fold,ecg_id,patient), merged with earlier rows, written atomically."""
    path = out / "labels.csv"
    rows: dict[str, dict[str, str]] = {}
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) == LABEL_COLUMNS:
                rows = {r["path"]: r for r in reader if (out / r["path"]).is_file()}
    for ref in refs:
        rel = f"images/{ref.name}.{fmt}"
        label = ";".join(c for c in SUPERCLASSES if c in ref.labels)
        rows[rel] = {"path": rel, "label": label, **{c: ref.meta.get(c, "") for c in LABEL_COLUMNS[2:]}}
    tmp = path.with_name(f"labels.csv.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))
    os.replace(tmp, path)
    return path


__all__ = [
    "RenderConfig", "render_printout", "render_dataset", "vary_config", "header_text", "record_rng",
    "save_atomic", "write_labels", "PAGE_MM", "SPEED_MM_S", "GAIN_MM_MV", "HEADER_MM", "TRACE_X0_MM",
    "CAL_X_MM", "ROW_BASELINES_MM", "LAYOUT", "COLUMN_S",
]
