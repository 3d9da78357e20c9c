"""Reading pages for fine-tuning, on real rendered PTB-XL pages: threads read what one thread reads, and pages past the budget are
kept compressed, lossless, and training sees exactly the same pixels and views."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
import torch

from dist_cardio.data.torchvision_pipeline import build_torchvision_transform
from dist_cardio.downstream.finetune import load_finetune_config
from dist_cardio.downstream.finetune_model import ImageSet
from dist_cardio.downstream.hospital_data import CompressedPage, load_images, page_image, read_hospital
from dist_cardio.signals.render import RenderConfig, render_dataset

REPO = Path(__file__).resolve().parents[2]


def test_pages_past_the_budget_are_compressed_losslessly_and_train_the_same(shared_data, tmp_path):
    render_dataset(shared_data / "ptbxl-500", tmp_path / "pages", RenderConfig(dpi=100), workers=1, limit=10)
    hospital = tmp_path / "hospital"
    with open(tmp_path / "pages" / "labels.csv") as f:
        for row in csv.DictReader(f):
            label = "NORM" if row["label"] == "NORM" else "OTHER"
            (hospital / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "pages" / row["path"], hospital / label)
    cfg = load_finetune_config(REPO / "configs" / "finetune" / "cpu-small.yaml")
    shape = (cfg.model.input_height, cfg.model.input_size)
    items = read_hospital(hospital).items
    decoded = load_images(items, cfg.page, cfg.image_cache, progress=False, input_shape=shape)
    one_page_mb = 3 * decoded.images[0].width * decoded.images[0].height / 2**20
    bounded = load_images(items, cfg.page, cfg.image_cache, progress=False, input_shape=shape, cache_mb=2.5 * one_page_mb)

    kinds = [isinstance(page, CompressedPage) for page in bounded.images]
    assert kinds == [False, False] + [True] * (len(items) - 2)  # two pages fit the budget, the rest are compressed
    assert bounded.pixels == decoded.pixels and bounded.hashes == decoded.hashes
    for page, original in zip(bounded.images, decoded.images):
        assert np.array_equal(np.asarray(page_image(page)), np.asarray(original))
    compressed = sum(len(p.data) for p in bounded.images if isinstance(p, CompressedPage))
    assert compressed < 0.5 * 3 * sum(p.size[0] * p.size[1] for p in bounded.images if isinstance(p, CompressedPage))

    transform = build_torchvision_transform(dataclasses.replace(cfg.augment, size=shape[1], height=shape[0]), train=True)
    targets = torch.zeros(len(items), dtype=torch.int64)
    views = []
    for images in (decoded.images, bounded.images):
        torch.manual_seed(0)
        views.append(torch.stack([x for x, _ in ImageSet(images, targets, transform)]))
    assert torch.equal(views[0], views[1])


def test_threads_read_the_same_pages_copies_and_failures_in_the_same_order_as_one_thread(shared_data, tmp_path):
    render_dataset(shared_data / "ptbxl-500", tmp_path / "pages", RenderConfig(dpi=100), workers=1, limit=6)
    pages = sorted((tmp_path / "pages").rglob("*.png"))
    hospital = tmp_path / "hospital"
    for i, page in enumerate(pages):
        (hospital / ("NORM" if i % 2 else "MI")).mkdir(parents=True, exist_ok=True)
        shutil.copy(page, hospital / ("NORM" if i % 2 else "MI") / page.name)
    first = Image.open(pages[0])
    first.convert("RGB").save(hospital / "MI" / "a-jpeg-cut-short.jpg", quality=90)
    jpeg = (hospital / "MI" / "a-jpeg-cut-short.jpg").read_bytes()
    (hospital / "MI" / "a-jpeg-cut-short.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    first.save(hospital / "NORM" / "re-encoded-copy.png", compress_level=1)  # same pixels, other bytes
    shutil.copy(pages[1], hospital / "MI" / "same-file-again.png")
    first.convert("P").save(hospital / "NORM" / "palette.png")  # a mode that rgb_page converts
    (hospital / "NORM" / "empty.png").write_bytes(b"")

    cfg = load_finetune_config(REPO / "configs" / "finetune" / "cpu-small.yaml")
    shape = (cfg.model.input_height, cfg.model.input_size)
    items = read_hospital(hospital).items
    one, two = (load_images(items, cfg.page, cfg.image_cache, progress=False, input_shape=shape, workers=w) for w in (1, 2))

    assert sorted(name for name, _ in one.errors) == ["MI/a-jpeg-cut-short.jpg", "NORM/empty.png"]
    assert one.errors == two.errors
    assert [it.id for it in one.items] == [it.id for it in two.items] and len(one.items) == len(items) - 2
    assert one.hashes == two.hashes and one.pixels == two.pixels
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one.images, two.images))
    kept = [it.id for it in two.unique().items]
    assert kept == [it.id for it in one.unique().items] and "NORM/palette.png" in [it.id for it in one.items]
    for copies in ({f"MI/{pages[0].name}", "NORM/re-encoded-copy.png"}, {f"NORM/{pages[1].name}", "MI/same-file-again.png"}):
        assert len(copies & set(kept)) == 1  # a picture filed twice is used once
