"""Reading one hospital's labelled images, in the three forms hospitals hand them over.

- a folder of class sub-folders (`data/MI/scan001.jpg`; images anywhere below a class folder),
- a CSV `path,label[,strat_fold,patient,...]` (paths relative to the CSV; `A;B` is multi-label), or a
  folder holding `labels.csv` (what `dist-cardio render` writes),
- a labelled shard set (`dist-cardio shard --labels ...`, with `manifest.json`).

Images are decoded once, cropped/masked to the ECG grid (`page.py`) and shrunk to a small square working
size, so epochs never touch full-size scans again. Every image is hashed, its bytes and its decoded pixels:
copies (the same file, or the same picture re-encoded) are used once, and the split keeps a patient's images
together. An unreadable image is reported (id and reason, in the run's own report) and left out; the rest is
still used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image
from tqdm import tqdm

from dist_cardio.atomic import atomic_write_text
from dist_cardio.downstream.page import PageConfig
from dist_cardio.downstream.page_input import decode_side, load_image, model_image, read_image_file, reason_counts, rgb_page
from dist_cardio.shard.imagecheck import BadImage, in_order, worker_count
from dist_cardio.shard.safe_open import RefusedFile
from dist_cardio.shard.labels import parse_label, read_label_rows
from dist_cardio.shard.manifest import read_samples
from dist_cardio.shard.sources import IMAGE_SUFFIXES
from dist_cardio.shard.writer import read_shard

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
"""A folder holding this file is read as a CSV data set (the layout `dist-cardio render` writes)."""


@dataclass(frozen=True)
class HospitalImage:
    """One labelled image; `patient` is a pseudonymous group id for splitting and is never logged."""

    id: str
    """Path relative to the data root, or the shard sample key: what split files and predictions name."""
    labels: tuple[str, ...]
    patient: str | None = None
    strat_fold: int | None = None
    file: Path | None = None
    shard: Path | None = None
    root: Path | None = None
    """A folder data set's root: a symlink in it that leads outside is not followed."""


@dataclass
class HospitalData:
    root: Path
    kind: Literal["folders", "csv", "shards"]
    items: list[HospitalImage]
    multilabel: bool
    unlabeled: int = 0
    """Images or rows without a label, left out."""

    @property
    def classes(self) -> list[str]:
        return sorted({label for item in self.items for label in item.labels})


@dataclass
class LoadedImages:
    """The readable images (model-ready squares, same order as their items) and content hashes.

    `errors` lists (id, reason) for every image left out as unreadable.
    """

    items: list[HospitalImage]
    images: list[Image.Image | CompressedPage] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    copies: int = 0
    """Repeats dropped by `unique()`: the same bytes, or the same pixels in other bytes."""
    pixels: list[str] = field(default_factory=list)
    """sha256 of each model-ready image: equal for a re-encoded copy (other bytes, same pixels)."""

    def unique(self) -> LoadedImages:
        """The first image of every decoded picture: a scan filed 20 times, or re-saved as another PNG, must
        not count 20 times in the training loss or, worse, sit in train and test at once. Copies with other
        labels than the first are logged (count only: ids may name patients)."""
        first: dict[str, int] = {}
        conflicting = 0
        for i, (h, item) in enumerate(zip(self.pixels, self.items)):
            j = first.setdefault(h, i)
            conflicting += j != i and set(self.items[j].labels) != set(item.labels)
        if conflicting:
            log.warning("%d copies of an image carry other labels than its first copy: the first copy's labels are used",
                        conflicting)
        keep = sorted(first.values())
        return LoadedImages([self.items[i] for i in keep], [self.images[i] for i in keep], [self.hashes[i] for i in keep],
                            self.errors, self.copies + len(self.items) - len(keep),
                            [self.pixels[i] for i in keep])


def read_hospital(path: str | Path) -> HospitalData:
    """List a hospital's labelled images (no pixels read yet); the kind of data set is detected."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: hospital data not found (pass a folder of class sub-folders, a labels CSV, or a shard set)")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise ValueError(f"{root}: a data file must be a CSV with columns path,label")
        return _read_csv(root)
    if (root / "manifest.json").is_file():
        return _read_shards(root)
    if (root / LABELS_CSV).is_file():
        return _read_csv(root / LABELS_CSV)
    return _read_folders(root)


def _read_folders(root: Path) -> HospitalData:
    items, loose = [], 0
    # Not only regular files: a FIFO or device named like an image is listed, then refused by name in unreadable.txt.
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # .thumbnails/, .DS_Store and the like
            continue
        if len(rel.parts) < 2:
            loose += 1
            continue
        items.append(HospitalImage(rel.as_posix(), (rel.parts[0],), file=file, root=root))
    if not items:
        raise ValueError(
            f"{root}: no images in class sub-folders (expected {root}/<class>/<image>.png, a labels CSV, or a shard set)"
        )
    return HospitalData(root, "folders", items, multilabel=False, unlabeled=loose)


def _fold(value: str, where: str) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{where}: strat_fold {value!r} is not a fold number") from None


def _read_csv(csv_path: Path) -> HospitalData:
    rows = read_label_rows(csv_path)
    base = csv_path.parent
    items, unlabeled, multilabel = [], 0, False
    for i, row in enumerate(rows):
        label = parse_label(row["label"] or "")
        if label is None:
            unlabeled += 1
            continue
        multilabel |= isinstance(label, list)
        raw = (row["path"] or "").strip()
        if not raw:
            raise ValueError(f"{csv_path}: row {i + 2} has an empty path")
        file = Path(raw) if Path(raw).is_absolute() else base / raw
        items.append(HospitalImage(
            id=raw,
            labels=tuple(label) if isinstance(label, list) else (label,),
            patient=(row.get("patient") or "").strip() or None,
            strat_fold=_fold(row.get("strat_fold", ""), f"{csv_path} row {i + 2}"),
            file=file,
        ))
    if not items:
        raise ValueError(f"{csv_path}: no labelled rows")
    return HospitalData(csv_path, "csv", items, multilabel, unlabeled)


def _read_shards(root: Path) -> HospitalData:
    items, unlabeled, multilabel = [], 0, False
    for sample in read_samples(root):
        label = sample.get("label")
        if not label:
            unlabeled += 1
            continue
        multilabel |= isinstance(label, list)
        meta = sample.get("meta") or {}
        items.append(HospitalImage(
            id=sample["key"],
            labels=tuple(label) if isinstance(label, list) else (label,),
            patient=str(meta.get("patient") or "").strip() or None,
            strat_fold=_fold(str(meta.get("strat_fold") or ""), f"{root} sample {sample['key']}"),
            shard=root / sample["shard"],
        ))
    if not items:
        raise ValueError(f"{root}: the shard set holds no labelled samples (shard with --labels folders or a CSV)")
    return HospitalData(root, "shards", items, multilabel, unlabeled)


def _item_bytes(items: list[HospitalImage]) -> Iterator[tuple[int, bytes | str, str]]:
    """(index, image bytes or an error, sha256 of the original file) per item; shards read one tar at a time.

    A shard may hold a re-encoded copy (`--max-side`): its hash is the original file's, from the sample's
    json, so a model fine-tuned on shards still recognises its images among the original files.
    """
    by_shard: dict[Path, dict[str, int]] = defaultdict(dict)
    for i, item in enumerate(items):
        if item.shard is not None:
            by_shard[item.shard][item.id] = i
            continue
        try:
            data = read_image_file(item.file, item.root)
            yield i, data, hashlib.sha256(data).hexdigest()
        except OSError as e:
            yield i, f"cannot read: {e.strerror or type(e).__name__}", ""
        except RefusedFile as e:
            yield i, str(e), ""
    for shard, wanted in by_shard.items():
        try:
            for key, _, parts in read_shard(shard):
                if key in wanted:
                    image = next((parts[ext] for ext in ("png", "jpg") if ext in parts), None)
                    digest = json.loads(parts["json"]).get("sha256", key) if "json" in parts else key
                    yield wanted.pop(key), image if image is not None else f"sample {key} has no image in {shard.name}", digest
        except (OSError, ValueError) as e:
            for i in wanted.values():
                yield i, f"cannot read {shard.name}: {getattr(e, 'strerror', None) or type(e).__name__}", ""
            continue
        for i in wanted.values():
            yield i, f"sample not found in {shard.name}", ""


def load_images(items: list[HospitalImage], page: PageConfig, side: int, progress: bool = True,
                input_shape: tuple[int, int] | None = None, cache_mb: float | None = None,
                workers: int = 0) -> LoadedImages:
    """Decode, hash and shrink every image (to `model_image`'s geometry); unreadable ones land in
    `errors`, the rest keep their order. With `cache_mb`, pages past that many MB of pixels are kept as
    `CompressedPage`s (lossless), so the set's memory stays near the budget however many pages it has.
    `workers` threads (0: one per core, at most 8) search the grid and resize: numpy and Pillow do that
    without holding the GIL, and it is ~90% of the work (192 rendered pages: 13.4 s on one thread, 7.4 on two)."""
    results: dict[int, tuple[Image.Image | CompressedPage, str, str]] = {}
    errors: dict[int, str] = {}
    budget = None if cache_mb is None else cache_mb * 2**20
    shrunk = _shrunk_pages(items, page, side, input_shape, worker_count(workers))
    for i, outcome, digest in tqdm(shrunk, total=len(items), desc="read images", unit="img", disable=not progress):
        if isinstance(outcome, str):
            errors[i] = outcome
            continue
        img, pixels = outcome
        if budget is not None:
            budget -= len(img.getbands()) * img.width * img.height
            img = img if budget >= 0 else CompressedPage.of(img)
        results[i] = (img, digest, pixels)
    kept = sorted(results)
    return LoadedImages(
        items=[items[i] for i in kept],
        images=[results[i][0] for i in kept],
        hashes=[results[i][1] for i in kept],
        errors=[(items[i].id, errors[i]) for i in sorted(errors)],
        pixels=[results[i][2] for i in kept],
    )


def _shrunk_pages(items: list[HospitalImage], page: PageConfig, side: int, input_shape: tuple[int, int] | None,
                  workers: int) -> Iterator[tuple[int, tuple[Image.Image, str] | str, str]]:
    """(index, (model image, pixel digest) or an error, sha256 of the file) per item, in input order.

    Decoding stays on this thread (`load_image` sets the process-wide warning filter); at most two pages
    per thread are in flight, so memory stays bounded however large the set."""
    decoded_side = decode_side(page, side)

    def shrink(img: Image.Image) -> tuple[Image.Image, str] | str:
        try:
            copy = model_image(rgb_page(img, decoded_side), page, side, input_shape=input_shape)
        except BadImage as e:
            return str(e)
        return copy, pixel_digest(copy)

    def decoded() -> Iterator[tuple[tuple[int, str, str], Image.Image | None]]:
        """((index, error or "", file hash), the loaded image or None on an error)."""
        for i, data, digest in _item_bytes(items):
            if isinstance(data, str):
                yield (i, data, digest), None
                continue
            try:
                yield (i, "", digest), load_image(data, decoded_side)
            except BadImage as e:
                yield (i, str(e), digest), None

    with ThreadPoolExecutor(workers) as pool:
        for (i, error, digest), shrunk in in_order(pool, shrink, decoded(), 2 * workers):
            yield i, error or shrunk, digest


class CompressedPage:
    """A decoded page held as PNG bytes (fast level 1: ~4-8× smaller for ECG pages), decoded again per use
    with the same pixels; what a memory-bounded page cache keeps once its budget is spent."""

    def __init__(self, data: bytes, size: tuple[int, int]) -> None:
        self.data, self.size = data, size

    @classmethod
    def of(cls, img: Image.Image) -> CompressedPage:
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        return cls(buf.getvalue(), img.size)

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.data)) as img:
            img.load()
            return img.copy() if img.mode == "RGB" else img.convert("RGB")


def page_image(page: Image.Image | CompressedPage) -> Image.Image:
    """The pixels of a cached page, whichever way the cache holds it."""
    return page.image() if isinstance(page, CompressedPage) else page


def pixel_digest(img: Image.Image) -> str:
    """sha256 over an image's mode, size and pixels: what two encodings of one picture share."""
    return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()


def write_unreadable(report: Path, errors: list[tuple[str, str]]) -> None:
    """`id<TAB>reason` per unreadable image into the run's own `report`; the console gets counts per reason only
    (ids are file names, which may name patients, and consoles end up in shared job logs)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, "".join(f"{item_id}\t{reason}\n" for item_id, reason in errors))
    log.warning("left out %d unreadable images (%s); which ones: %s", len(errors), reason_counts([r for _, r in errors]), report)


def describe(data: HospitalData) -> str:
    """One line for logs: kind, counts, classes (no patient ids)."""
    counts = defaultdict(int)
    for item in data.items:
        for label in item.labels:
            counts[label] += 1
    return (f"{data.kind} data set {data.root}: {len(data.items)} labelled images"
            f"{f' ({data.unlabeled} without a label left out)' if data.unlabeled else ''}, "
            f"{'multi' if data.multilabel else 'single'}-label, classes {json.dumps(dict(sorted(counts.items())))}")


__all__ = ["HospitalImage", "HospitalData", "LoadedImages", "read_hospital", "load_images", "write_unreadable", "describe", "LABELS_CSV"]
