"""Rendering throughput: images/s of `render_dataset` at a given worker count, plus a per-stage breakdown.

    python benchmarks/render.py [--input PATH] [--n 200] [--workers 2] [--dpi 200] [--format png] [--vary]
                                [--quick] [--json results.json]

The stage breakdown (read, draw, encode; one process) shows where the time goes; the end-to-end run
is what a user sees, pool start-up and labels.csv included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dist_cardio.signals.records import SAMPLE_PTBXL, list_records, load_record
from dist_cardio.signals.render import (
    RenderConfig,
    header_text,
    record_rng,
    render_dataset,
    render_printout,
    save_atomic,
    vary_config,
)


def stage_times(source: Path, cfg: RenderConfig, n: int, vary: bool, tmp: Path) -> dict[str, float]:
    """Median milliseconds per image of each stage, in this process."""
    times: dict[str, list[float]] = {"read": [], "draw": [], "encode": []}
    for ref in list_records(source)[:n]:
        t0 = time.perf_counter()
        record = load_record(ref)
        t1 = time.perf_counter()
        rng = record_rng(0, ref.name)
        page_cfg = vary_config(cfg, rng) if vary else cfg
        img = render_printout(record.signal_mv, record.fs, page_cfg, header_text(record.name, record.fs), rng)
        t2 = time.perf_counter()
        save_atomic(img, tmp / f"stage.{cfg.format}", page_cfg)
        t3 = time.perf_counter()
        for stage, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[stage].append(seconds * 1000)
    return {stage: statistics.median(v) for stage, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=SAMPLE_PTBXL,
                        help="records to render (default: the built-in sample)")
    parser.add_argument("--n", type=int, default=200, help="records to render")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dpi", type=int, default=200)
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--vary", action="store_true", help="per-image variation (rotation, blur, noise...)")
    parser.add_argument("--quick", action="store_true", help="20 records, 5 for the stage breakdown")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    n = 20 if args.quick else args.n
    cfg = RenderConfig(dpi=args.dpi, format=args.format)
    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        stages = stage_times(args.input, cfg, 5 if args.quick else min(n, 20), args.vary, Path(tmp))
        summary = render_dataset(args.input, Path(tmp) / "out", cfg, args.workers, n, args.vary, seed=0)
        files = list((Path(tmp) / "out" / "images").iterdir())
        mean_kb = sum(f.stat().st_size for f in files) / max(1, len(files)) / 1024
    rate = summary["written"] / summary["seconds"]
    width, height = cfg.size
    print(f"input {args.input}  cpus {os.cpu_count()}  python {sys.version.split()[0]}")
    print(f"{'workers':>7} {'images':>6} {'dpi':>4} {'size':>10} {'fmt':>4} {'vary':>5} {'read ms':>8} "
          f"{'draw ms':>8} {'encode ms':>9} {'KB/img':>7} {'seconds':>8} {'images/s':>9}")
    print(f"{args.workers:>7} {summary['written']:>6} {args.dpi:>4} {f'{width}x{height}':>10} {args.format:>4} "
          f"{str(args.vary):>5} {stages['read']:>8.1f} {stages['draw']:>8.1f} {stages['encode']:>9.1f} "
          f"{mean_kb:>7.0f} {summary['seconds']:>8.2f} {rate:>9.2f}")
    if summary["failed"]:
        print(f"{summary['failed']} records failed to render", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "images_per_s": rate, "workers": args.workers, "width": width, "height": height,
            "images": summary["written"], "dpi": args.dpi, "format": args.format, "vary": args.vary,
            "stage_ms": stages, "mean_kb": mean_kb,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
