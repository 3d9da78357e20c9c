"""From an image file to the classifier's input array, with numpy and Pillow only.

Fine-tuning, evaluate, predict and explain (PyTorch) and `predict --model` (ONNX Runtime, where torch is
not installed) all prepare a page here: decode, crop/mask to the grid (`page.py`), resize to the working
copy at the input's aspect, resize to the input, normalise. So a model sees the same pixels whichever
runtime serves it; the evaluation transform of the training loader (torchvision) gives the same floats
bit for bit (tested).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dist_cardio.downstream.page import GridBox, PageConfig, apply_page, prepare_page
from dist_cardio.shard.imagecheck import BadImage, check_structure, open_image, verify_jpeg
from dist_cardio.shard.safe_open import MAX_IMAGE_BYTES, RefusedFile, read_regular
from dist_cardio.shard.sources import IMAGE_SUFFIXES


def decode_image(data: bytes, max_side: int) -> Image.Image:
    """Validated bytes → RGB image, long side at most `max_side` px; raises BadImage naming the damage."""
    return rgb_page(load_image(data, max_side), max_side)


def load_image(data: bytes, max_side: int) -> Image.Image:
    """Validated bytes → the decoded image in its own mode; raises BadImage naming the damage.

    JPEGs are entropy-decoded strictly first (as `shard` does): Pillow pads a stream cut short or damaged
    mid-scan with grey, and the model would return confident numbers for half a page. Not thread-safe:
    Pillow's warnings are silenced through the process-wide filter (`rgb_page` is thread-safe)."""
    check_structure(data)
    img = open_image(data)
    if img.format == "JPEG":
        verify_jpeg(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if img.format == "JPEG":  # decode at reduced scale (DCT scaling): much cheaper for big scans
            img.draft("RGB", (max_side, max_side))
        try:
            img.load()
        except Exception as e:  # Pillow raises many types for damaged data
            raise BadImage(f"undecodable {img.format}: {e}") from None
    return img


def rgb_page(img: Image.Image, max_side: int) -> Image.Image:
    """A loaded image → RGB on white paper (transparent areas are paper, not black), long side ≤ `max_side`."""
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.BOX)
    return img


def decode_side(page: PageConfig, side: int) -> int:
    """Size pages are decoded at: enough for the model input and for the grid search."""
    return max(side, page.detect_side) if page.mode != "none" else side


def cache_shape(width: int, input_shape: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the kept copy of a page: `width` px wide at the model input's aspect."""
    h, w = input_shape
    return max(1, round(width * h / w)), width


def model_image(img: Image.Image, page: PageConfig, side: int, grid: GridBox | None = None,
                input_shape: tuple[int, int] | None = None) -> Image.Image:
    """What the model is fed from: the page cropped/masked per `page`, resized to `side` px wide at the
    aspect of `input_shape` (height, width; None: square `side`×`side`).

    Resizing the whole page (not centre-cropping) keeps all twelve leads; at the input's own aspect it
    also keeps the traces' proportions (a square would squeeze a landscape page by 1.4×). Training,
    evaluation, prediction and Grad-CAM all use this one geometry, so a map at input resolution maps back
    by a plain resize. `grid`: the page's grid box when already found (the search is the costly part).
    """
    prepared = prepare_page(img, page) if grid is None else apply_page(img, page, grid)
    h, w = cache_shape(side, input_shape or (side, side))
    return prepared.resize((w, h), Image.Resampling.LANCZOS)


def input_array(img: Image.Image, shape: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """`img` → float32 ``[3, H, W]`` as the evaluation transform makes it: bilinear resize to `shape`
    (Pillow's, as torchvision's `Resize` on a PIL image), scale to [0, 1], subtract `mean`, divide by `std`."""
    h, w = shape
    img = img if img.mode == "RGB" else img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


@dataclass(frozen=True)
class InputSpec:
    """How a page becomes a fine-tuned classifier's input; an exported model carries it in its metadata."""

    page: PageConfig
    image_cache: int
    """Width of the working copy of a page (at the input's aspect), as in fine-tuning."""
    input_shape: tuple[int, int]
    """``(height, width)`` of the classifier's input."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def decode_side(self) -> int:
        return decode_side(self.page, self.image_cache)

    def page_copy(self, page: Image.Image, grid: GridBox | None = None) -> Image.Image:
        """The decoded page cropped/masked and resized exactly as in fine-tuning."""
        return model_image(page, self.page, self.image_cache, grid, self.input_shape)

    def array(self, copy: Image.Image) -> np.ndarray:
        """A page copy (`page_copy`) → the normalised float32 ``[3, H, W]`` input."""
        return input_array(copy, self.input_shape, self.mean, self.std)

    def batch(self, pages: list[Image.Image]) -> np.ndarray:
        """Decoded pages → the ``[B, 3, H, W]`` batch the classifier takes."""
        return np.stack([self.array(self.page_copy(p)) for p in pages])

    def to_dict(self) -> dict[str, Any]:
        p = self.page
        return {"page": {"mode": p.mode, "fallback_box": list(p.fallback_box), "detect_side": p.detect_side,
                         "min_density": p.min_density},
                "image_cache": self.image_cache, "input_shape": list(self.input_shape),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """The inverse of `to_dict`; raises KeyError/TypeError/ValueError on a malformed dict. (Not
        `config.from_dict`: that needs PyYAML, which a deployment does not install.)"""
        p = d["page"]
        page = PageConfig(mode=p["mode"], fallback_box=tuple(map(float, p["fallback_box"])),
                          detect_side=int(p["detect_side"]), min_density=float(p["min_density"]))
        if page.mode not in ("none", "crop", "mask"):
            raise ValueError(f"page mode {page.mode!r}")
        h, w = map(int, d["input_shape"])
        return cls(page, int(d["image_cache"]), (h, w), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Files named directly, plus the images inside named folders (recursively, sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # FIFOs and devices named like images are listed too: reading refuses them, and the CSV says why.
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    return files


def read_image_file(path: Path, root: Path | None = None) -> bytes:
    """The bytes of one user image: regular files only (a FIFO would hang, `/dev/zero` never ends), at most
    MAX_IMAGE_BYTES, symlinks kept inside `root`. OSError or RefusedFile, whose text names no file."""
    return read_regular(path, MAX_IMAGE_BYTES, root)


def read_pages(files: list[Path], *sides: int) -> tuple[list[tuple[Path, tuple[Image.Image, ...]]], list[tuple[Path, str]]]:
    """Each readable file decoded once per size in `sides` (long side at most that), and (file, reason) for the rest."""
    pages, errors = [], []
    for f in files:
        try:
            data = read_image_file(f)
            decoded = {side: decode_image(data, side) for side in dict.fromkeys(sides)}
            pages.append((f, tuple(decoded[side] for side in sides)))
        except (OSError, BadImage, RefusedFile) as e:
            errors.append((f, getattr(e, "strerror", None) or str(e)))
    return pages, errors


def reason_counts(reasons: list[str]) -> str:
    """``"truncated PNG: 2, not a regular file: 1"``: what the console says of unreadable files. File names stay
    in the run's own report (CSV, audit, unreadable.txt): they may name patients, and consoles end up in job logs."""
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = reason.split(":")[0].strip() or "unreadable"
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))


__all__ = ["decode_image", "load_image", "rgb_page", "decode_side", "cache_shape", "model_image", "input_array", "InputSpec", "image_files", "read_image_file", "read_pages", "reason_counts"]
