"""Sharding and verifying throughput beside plain `tar cf` and beside validation alone, in one run.

`tar cf` only copies bytes; `dist-cardio shard` also hashes, validates (structure checks plus a full
decode per image), converts BMP/TIFF and fsyncs every shard, so tar_ratio (our MB/s ÷ tar's) says what
that safety costs. "validate only" is exactly a shard worker's per-image work (read, sha256, the same
checks, the same BMP/TIFF conversion) in this one process, writing nothing; validate_ratio = shard's
images/s ÷ (workers × validate-only images/s) says how close the parallel run comes to its workers doing
nothing but that work. verify_speedup = verify's seconds with 1 worker ÷ with the shard's worker count.
Everything reads from a warm page cache with the decoders already loaded; rounds alternate the methods
(so load from other users hits them alike) and the fastest round of each counts. Other processes' CPU
use during the parallel runs is measured (/proc/stat) and reported: on shared cores it lowers both ratios.

    .venv/bin/python benchmarks/shard.py --quick
    .venv/bin/python benchmarks/shard.py --input DIR --workers 8 --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dist_cardio.shard import ShardConfig, shard_inputs, verify_shard_set
from dist_cardio.shard.build import prepare, task_for
from dist_cardio.shard.sources import Candidate, classify, walk_input

DEFAULT_INPUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ecg-printouts"
T = TypeVar("T")
MIN_PER_WORKER = 4  # fewer images per worker measure process start-up, not throughput: ratios are n/a


def image_files(root: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and classify(p.name) == "image")
    return files[:limit] if limit else files


def time_validate(files: list[Path], cfg: ShardConfig) -> float:
    """Seconds for the shard workers' per-image work on ``files``, here, one after the other."""
    start = time.perf_counter()
    for f in files:
        for item in walk_input(f, cfg.limits):
            if isinstance(item, Candidate):
                prepare(task_for(item, cfg))
    return time.perf_counter() - start


def time_shard(files: list[Path], out: Path, cfg: ShardConfig) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = shard_inputs(files, out, cfg)
    return time.perf_counter() - start, summary


def time_verify(out: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    report = verify_shard_set(out, progress=False, workers=workers)
    seconds = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"verify found problems in a set shard just wrote:\n{report.text()}")
    return seconds, report.samples


def time_tar(files: list[Path], root: Path, work: Path) -> float:
    out = work / "plain.tar"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(root), *(str(p.relative_to(root)) for p in files)], check=True)
    with open(out, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, CPU seconds this process and its ended children used)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):  # not Linux
        busy = float("nan")
    usage = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    own = sum(r.ru_utime + r.ru_stime for r in usage)
    return busy, own


class Contention:
    """Cores other processes kept busy while the parallel runs ran (those that need every core)."""

    def __init__(self) -> None:
        self.others = self.wall = 0.0

    def measure(self, run: Callable[[], T]) -> T:
        (busy, own), start = cpu_seconds(), time.perf_counter()
        result = run()
        (busy_end, own_end) = cpu_seconds()
        self.others += max(0.0, (busy_end - busy) - (own_end - own))
        self.wall += time.perf_counter() - start
        return result

    @property
    def cores(self) -> float:
        return self.others / self.wall if self.wall else 0.0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="folder of images (searched recursively)")
    parser.add_argument("--workers", type=int, default=0, help="shard and verify workers (0 = CPU cores, at most 8)")
    parser.add_argument("--max-side", type=int, help="also store a training-resolution copy (re-encodes)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="first 12 images only, one round")
    parser.add_argument("--json", type=Path, help="write {images_per_s, tar_ratio, validate_ratio, ...} here")
    args = parser.parse_args()

    if not args.input.is_dir():
        raise SystemExit(f"{args.input}: not a folder of images (pass --input DIR)")
    files = image_files(args.input, 12 if args.quick else None)
    if not files:
        raise SystemExit(f"{args.input}: no images found")
    repeat = 1 if args.quick else max(1, args.repeat)
    mb = sum(p.stat().st_size for p in files) / 1e6
    cfg = ShardConfig(workers=args.workers, max_side=args.max_side, progress=False)
    workers = cfg.n_workers
    for p in files:  # warm the page cache so no method pays for the first read
        p.read_bytes()
    time_validate(list({p.suffix.lower(): p for p in files}.values()), cfg)  # load every decoder: no method pays that

    runs: dict[str, list[float]] = {"validate": [], "shard": [], "tar": [], "verify1": [], "verifyN": []}
    contention = Contention()
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        work = Path(tmp)
        for _ in range(repeat):
            runs["validate"].append(time_validate(files, cfg))
            seconds, summary = contention.measure(lambda: time_shard(files, work / "shards", cfg))
            runs["shard"].append(seconds)
            runs["tar"].append(time_tar(files, args.input, work))
            seconds, samples = time_verify(work / "shards", 1)
            runs["verify1"].append(seconds)
            if workers > 1:
                runs["verifyN"].append(contention.measure(lambda: time_verify(work / "shards", workers))[0])
    others = contention.cores
    best = {name: min(times) for name, times in runs.items() if times}
    n = len(files)
    enough = n >= MIN_PER_WORKER * workers
    too_few = None if enough else f"under {MIN_PER_WORKER} images per worker: that times start-up"
    validate_ratio = (n / best["shard"]) / (workers * n / best["validate"]) if too_few is None else None
    if not samples:
        too_few = too_few or "no image passed validation"
    verify_speedup = best["verify1"] / best["verifyN"] if too_few is None and workers > 1 else None

    print(f"{n} images, {mb:.1f} MB from {args.input} (workers={workers} on {cores()} cores, max_side={args.max_side}, "
          f"best of {repeat}); shard: added {summary['added']}, duplicates {summary['duplicates']}, "
          f"skipped {summary['skipped']}, {len(summary['shards'])} shard(s)")
    plural = "s" if workers > 1 else ""
    rows = [("validate only, 1 process", best["validate"], n),
            (f"dist-cardio shard, {workers} worker{plural}", best["shard"], n),
            ("tar cf", best["tar"], n), ("verify, 1 worker", best["verify1"], samples)]
    if "verifyN" in best:
        rows.append((f"verify, {workers} workers", best["verifyN"], samples))
    print(f"{'method':<32}{'seconds':>9}{'images/s':>10}{'MB/s':>8}")
    for name, s, count in rows:
        rate = f"{count / s:>10.1f}{mb / s:>8.1f}" if count else f"{'-':>10}{'-':>8}"
        print(f"{name:<32}{s:>9.2f}{rate}")
    result = {
        "images_per_s": n / best["shard"],
        "mb_per_s": mb / best["shard"],
        "tar_ratio": best["tar"] / best["shard"],
        "tar_mb_per_s": mb / best["tar"],
        "validate_images_per_s": n / best["validate"],
        "validate_ratio": validate_ratio,
        "verify_images_per_s": samples / best["verifyN" if "verifyN" in best else "verify1"],
        "verify_speedup": verify_speedup,
        "images": n,
        "mb": mb,
        "workers": workers,
        "cores": cores(),
        "max_side": args.max_side,
        "repeat": repeat,
        "other_cores_busy": others,
    }
    print(f"tar_ratio (shard MB/s ÷ tar's) = {result['tar_ratio']:.3f}")
    print(f"validate_ratio (shard images/s ÷ ({workers} × validate-only images/s)) = "
          + (f"{validate_ratio:.3f}" if validate_ratio is not None else f"n/a ({too_few})"))
    if workers > 1:
        print(f"verify_speedup (verify s with 1 worker ÷ with {workers}) = "
              + (f"{verify_speedup:.2f}" if verify_speedup is not None else f"n/a ({too_few})"))
    if workers > cores():
        print(f"note: {workers} workers on {cores()} cores: the ratios' ideal assumes a core per worker")
    if workers > 1 and others > 0.1 * cores():  # nan (unknown) compares False
        print(f"note: other processes kept {others:.1f} of the {cores()} cores busy during the parallel runs, so "
              "validate_ratio and verify_speedup understate; rerun on a quiet machine")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
