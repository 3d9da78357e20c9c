"""Sharding throughput beside plain `tar cf` over the same files, in one run.

`tar cf` only copies bytes; `dist-cardio shard` also hashes, validates (structure checks plus a
Pillow decode per image), converts BMP/TIFF and fsyncs every shard, so tar_ratio (our MB/s ÷ tar's)
says what that safety costs. Both read from a warm page cache and both end with the output fsynced.

    .venv/bin/python benchmarks/shard.py --quick
    .venv/bin/python benchmarks/shard.py --input DIR --workers 8 --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.shard.sources import classify

DEFAULT_INPUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ecg-printouts"


def image_files(root: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and classify(p.name) == "image")
    return files[:limit] if limit else files


def time_shard(files: list[Path], work: Path, cfg: ShardConfig) -> tuple[float, dict]:
    out = work / "shards"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = shard_inputs(files, out, cfg)
    return time.perf_counter() - start, summary


def time_tar(files: list[Path], root: Path, work: Path) -> float:
    out = work / "plain.tar"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(root), *(str(p.relative_to(root)) for p in files)], check=True)
    with open(out, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="folder of images (searched recursively)")
    parser.add_argument("--workers", type=int, default=0, help="shard workers (0 = CPU cores, at most 8)")
    parser.add_argument("--max-side", type=int, help="also store a training-resolution copy (re-encodes)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="first 12 images only, one run")
    parser.add_argument("--json", type=Path, help="write {images_per_s, mb_per_s, tar_ratio, ...} here")
    args = parser.parse_args()

    if not args.input.is_dir():
        raise SystemExit(f"{args.input}: not a folder of images (pass --input DIR)")
    files = image_files(args.input, 12 if args.quick else None)
    if not files:
        raise SystemExit(f"{args.input}: no images found")
    repeat = 1 if args.quick else max(1, args.repeat)
    mb = sum(p.stat().st_size for p in files) / 1e6
    for p in files:  # warm the page cache so neither side pays for the first read
        p.read_bytes()
    cfg = ShardConfig(workers=args.workers, max_side=args.max_side, progress=False)

    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        work = Path(tmp)
        shard_runs = [time_shard(files, work, cfg) for _ in range(repeat)]
        tar_s = min(time_tar(files, args.input, work) for _ in range(repeat))
    shard_s, summary = min(shard_runs, key=lambda r: r[0])

    rows = [("dist-cardio shard", shard_s), ("tar cf", tar_s)]
    print(f"{len(files)} images, {mb:.1f} MB from {args.input} (workers={cfg.n_workers}, max_side={args.max_side}, "
          f"best of {repeat}); shard: added {summary['added']}, duplicates {summary['duplicates']}, "
          f"skipped {summary['skipped']}, {len(summary['shards'])} shard(s)")
    print(f"{'method':<20}{'seconds':>10}{'images/s':>12}{'MB/s':>10}")
    for name, s in rows:
        print(f"{name:<20}{s:>10.2f}{len(files) / s:>12.1f}{mb / s:>10.1f}")
    result = {
        "images_per_s": len(files) / shard_s,
        "mb_per_s": mb / shard_s,
        "tar_ratio": (mb / shard_s) / (mb / tar_s),
        "tar_mb_per_s": mb / tar_s,
        "images": len(files),
        "mb": mb,
        "workers": cfg.n_workers,
        "max_side": args.max_side,
    }
    print(f"tar_ratio (our MB/s ÷ tar's) = {result['tar_ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
