"""Loader throughput: the DALI-CPU pipeline beside a plain torchvision + webdataset + DataLoader one.

Both read the same shards and make the same two augmented 224² views per image (``AugmentConfig``
defaults); images/s counts images (two views each), timed from the first batch to the end of the epoch
so pipeline start-up is not counted, median of ``--repeat`` runs, the contenders interleaved. The plain
baseline is what a user writes with stock parts: ``webdataset.decode("pil")`` then torchvision v2
``RandomResizedCrop``/``RandomRotation``/``ColorJitter``/... per view. This project's own torchvision
fallback (DCT-scaled JPEG decode) is shown as a third column.

Data: (a) full-size printouts rendered from PTB-XL at 200 dpi (2339×1654 JPEG q90, via
``dist_cardio.signals.render``), (b) the 52 real printouts of ``ecg-printouts`` (mixed sizes and formats).
Rendered pages and shards are cached under ``--work``.

    .venv/bin/python benchmarks/loader.py --quick
    .venv/bin/python benchmarks/loader.py --json loader.json          # 300 pages, 3 repeats
    .venv/bin/python benchmarks/loader.py --profile --quick           # where one core's time goes
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
import webdataset as wds
from torch.utils.data import DataLoader

from dist_cardio.data import AugmentConfig, LoaderConfig, contrastive_loader
from dist_cardio.data.torchvision_pipeline import SampleViews
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.shard import ShardConfig, shard_inputs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prepare(work: Path, pages: int, ptbxl: Path, printouts: Path) -> dict[str, Path]:
    """Shard sets for both datasets (rendered once, cached); several shards so 2 workers can split them."""
    rendered = work / f"rendered-{pages}"
    render_dataset(ptbxl, rendered, RenderConfig(dpi=200, format="jpg", jpeg_quality=90), workers=os.cpu_count() or 1,
                   limit=pages)
    sets = {"full_size": (rendered / "images", work / f"shards-full-{pages}"), "real_printouts": (printouts, work / "shards-real")}
    out = {}
    for name, (images, shards) in sets.items():
        if not (shards / "manifest.json").is_file():
            count = sum(1 for p in images.iterdir() if p.is_file())
            shard_inputs([images], shards, ShardConfig(max_count=max(1, math.ceil(count / 8)), progress=False))
        out[name] = shards
    return out


def plain_views(aug: AugmentConfig) -> T.Compose:
    """Stock torchvision v2, same ranges as ``aug`` (defaults of each op otherwise)."""
    return T.Compose([
        T.RandomResizedCrop(aug.size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
        T.RandomRotation(aug.rotation, fill=aug.rotation_fill),
        T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p),
        T.RandomGrayscale(aug.grayscale_p),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(aug.mean, aug.std),
    ])


class TwoViews:
    def __init__(self, aug: AugmentConfig) -> None:
        self.view = plain_views(aug)

    def __call__(self, sample: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        img = sample[0].convert("RGB")
        return self.view(img), self.view(img)


def plain_loader(shards: Path, aug: AugmentConfig, threads: int, batch: int) -> DataLoader:
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    dataset = (wds.WebDataset(tars, shardshuffle=False, empty_check=False)
               .decode("pil").to_tuple("jpg;png").map(TwoViews(aug)).batched(batch, partial=True))
    # forkserver: this process has DALI's threads, and forking it can deadlock a worker (start-up is not timed)
    return DataLoader(dataset, batch_size=None, num_workers=threads, prefetch_factor=2, multiprocessing_context="forkserver")


def ours(shards: Path, aug: AugmentConfig, threads: int, batch: int, backend: str, decode: str = "auto"):
    cfg = LoaderConfig(shards=str(shards), batch_size=batch, num_threads=threads, backend=backend, device="cpu",
                       decode=decode, shuffle=False)
    return contrastive_loader(cfg, aug, 0, 1)


def rate(batches) -> float:
    """Images/s from the first batch to the end (start-up, e.g. worker spawn or buffer fill, excluded)."""
    it = iter(batches)
    next(it)
    start, n = time.perf_counter(), 0
    for view1, _ in it:
        n += len(view1)
    return n / (time.perf_counter() - start)


def compare(shards: dict[str, Path], aug: AugmentConfig, threads: list[int], batch: int, repeat: int) -> dict:
    results: dict = {}
    for name, path in shards.items():
        for tar in path.glob("*.tar"):  # warm the page cache for everyone
            tar.read_bytes()
        for t in threads:
            runs: dict[str, list[float]] = {"dali": [], "torchvision": [], "fallback": []}
            for _ in range(repeat):
                runs["dali"].append(rate(ours(path, aug, t, batch, "dali")))
                runs["torchvision"].append(rate(plain_loader(path, aug, t, batch)))
                runs["fallback"].append(rate(ours(path, aug, t, batch, "torchvision")))
            med = {k: statistics.median(v) for k, v in runs.items()}
            results.setdefault(name, {})[t] = {
                "dali_images_per_s": round(med["dali"], 2),
                "torchvision_images_per_s": round(med["torchvision"], 2),
                "ratio": round(med["dali"] / med["torchvision"], 3),
                "fallback_images_per_s": round(med["fallback"], 2),
            }
    return results


def profile(shards: Path, aug: AugmentConfig, batch: int) -> list[tuple[str, float]]:
    """CPU ms per image on one thread, by stage: DALI stages built from the same ops as the loader."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    tars = sorted(str(p) for p in shards.glob("*.tar"))
    idx = [t[:-4] + ".idx" for t in tars]

    def stage(upto: str):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=1)
        def pipe():
            enc = fn.readers.webdataset(paths=tars, index_paths=idx, ext="jpg;jpeg;png")
            if upto == "read":
                return enc
            page = fn.decoders.image(enc, output_type=types.RGB)
            if upto == "decode":
                return page
            return tuple(fn.random_resized_crop(page, size=(aug.size, aug.size), random_area=aug.crop_scale,
                                                random_aspect_ratio=aug.crop_ratio) for _ in range(2))
        p = pipe()
        p.build()
        return p

    def dali_ms(upto: str) -> float:
        p = stage(upto)
        p.run()
        runs = max(1, json.loads((shards / "manifest.json").read_text())["totals"]["samples"] // batch - 1)
        c = time.process_time()
        for _ in range(runs):
            p.run()
        return 1000 * (time.process_time() - c) / (runs * batch)

    def loader_ms(decode: str) -> float:
        loader = ours(shards, aug, 1, batch, "dali", decode)
        it = iter(loader)
        next(it)
        c, n = time.process_time(), 0
        for v1, _ in it:
            n += len(v1)
        return 1000 * (time.process_time() - c) / n

    blobs = [s for tar in tars for s in _images(tar)]
    views = plain_views(aug)

    def fallback_ms() -> float:
        loader = ours(shards, aug, 1, batch, "torchvision")
        samples = SampleViews(loader.plan, loader.plan.shard_set.all_samples())
        c = time.process_time()
        for i in range(len(samples)):
            samples[0, i]
        return 1000 * (time.process_time() - c) / len(samples)

    def pil_ms(with_views: bool) -> float:
        c = time.process_time()
        for data in blobs:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            if with_views:
                views(img), views(img)
        return 1000 * (time.process_time() - c) / len(blobs)

    return [
        ("DALI read (webdataset reader)", dali_ms("read")),
        ("DALI read + decode", dali_ms("decode")),
        ("DALI read + decode + 2 random resized crops", dali_ms("crops")),
        ("DALI full loader (+ rotate, jitter, normalise, torch copy)", loader_ms("full")),
        ("DALI full loader, decode: crop (fused ROI decode per view)", loader_ms("crop")),
        ("plain torchvision: PIL decode", pil_ms(False)),
        ("plain torchvision: PIL decode + 2 views", pil_ms(True)),
        ("fallback: DCT-scaled decode + 2 views (in-process)", fallback_ms()),
    ]


def _images(tar: str) -> list[bytes]:
    out = []
    for sample in wds.WebDataset(tar, shardshuffle=False, empty_check=False):
        out.append(sample.get("jpg") or sample.get("png"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=300, help="PTB-XL records rendered at 200 dpi (max 500)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="DALI threads / DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the median counts")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dist-cardio-bench-loader"), help="cache of pages and shards")
    parser.add_argument("--ptbxl", type=Path, default=DATA / "ptbxl-500")
    parser.add_argument("--printouts", type=Path, default=DATA / "ecg-printouts")
    parser.add_argument("--quick", action="store_true", help="40 pages, batch 8, one run")
    parser.add_argument("--profile", action="store_true", help="per-stage CPU cost on one thread instead")
    parser.add_argument("--json", type=Path, help="write the results (the largest --threads value) here")
    args = parser.parse_args()
    if args.quick:
        args.pages, args.batch_size, args.repeat = 40, 8, 1
    for path in (args.ptbxl, args.printouts):
        if not path.is_dir():
            raise SystemExit(f"{path}: not found (pass --ptbxl / --printouts)")
    torch.set_num_threads(1)
    aug = AugmentConfig()
    shards = prepare(args.work, args.pages, args.ptbxl, args.printouts)

    if args.profile:
        for name, path in shards.items():
            print(f"\n{name}: CPU ms per image, one thread, batch {args.batch_size}")
            for label, ms in profile(path, aug, args.batch_size):
                print(f"  {label:60s} {ms:7.1f}")
        return

    results = compare(shards, aug, args.threads, args.batch_size, args.repeat)
    print(f"\nimages/s (two {aug.size}² views each), median of {args.repeat}, batch {args.batch_size}")
    print(f"{'data':16s} {'threads':>7s} {'DALI-CPU':>9s} {'torchvision':>12s} {'ratio':>6s} {'fallback':>9s}")
    for name, by_threads in results.items():
        for t, r in by_threads.items():
            print(f"{name:16s} {t:7d} {r['dali_images_per_s']:9.1f} {r['torchvision_images_per_s']:12.1f} "
                  f"{r['ratio']:6.2f} {r['fallback_images_per_s']:9.1f}")
    if args.json:
        top = max(args.threads)
        report = {name: by_threads[top] for name, by_threads in results.items()}
        report["threads"] = top
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
