"""`dist-cardio render INPUT --out DIR`: ECG signals (PTB-XL, WFDB folder, .npz) → printout images + labels.csv."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dist_cardio.commands.arguments import at_least
from dist_cardio.config import load_config
from dist_cardio.signals.records import SAMPLE_PTBXL, InputError, read_id_list
from dist_cardio.signals.render import RenderConfig, render_dataset

# Flags named after RenderConfig fields; one given on the command line overrides --config and --set.
_FIELD_FLAGS = ("dpi", "grid", "line_width", "rotation", "noise", "blur", "format", "jpeg_quality")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="PTB-XL root (has ptbxl_database.csv), folder of WFDB records (.hea + .dat/.mat), "
                             "an .npz with X [N, T, 12], or 'sample' for the built-in 200 PTB-XL records")
    parser.add_argument("--out", required=True, type=Path, help="output folder: images/ and labels.csv")
    parser.add_argument("--config", type=Path, help="YAML file with RenderConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a RenderConfig field")
    parser.add_argument("--workers", type=at_least(1), default=_usable_cpus(),
                        help="render processes (default: the CPUs this process may use)")
    parser.add_argument("--limit", type=at_least(0), help="render only the first N records")
    parser.add_argument("--seed", type=int, default=0, help="seed for --vary and scan noise (per record, so stable)")
    parser.add_argument("--vary", action="store_true",
                        help="per image, sample dpi, grid colour, line width, rotation, noise, blur, header "
                             "and JPEG quality (augmentation)")
    parser.add_argument("--rate", type=int, choices=(100, 500), default=100, help="PTB-XL records100 or records500")
    parser.add_argument("--exclude-ids", type=Path, metavar="FILE",
                        help="drop these ecg_ids: a CSV with an ecg_id column (e.g. ptbxl_database.csv) "
                             "or one id a line")
    look = parser.add_argument_group("appearance (RenderConfig fields)")
    look.add_argument("--dpi", type=int, help="pixels per inch (default 200: A4 landscape = 2339×1654)")
    look.add_argument("--grid", choices=("red", "pink", "grey", "none"), help="grid paper colour")
    look.add_argument("--line-width", type=float, help="trace width in mm")
    look.add_argument("--rotation", type=float, help="page rotation in degrees")
    look.add_argument("--noise", type=float, help="scan noise standard deviation in grey levels")
    look.add_argument("--blur", type=float, help="blur radius in pixels")
    look.add_argument("--no-header", action="store_true", help="leave out the header line (a classifier shortcut)")
    look.add_argument("--format", choices=("png", "jpg"), help="image format")
    look.add_argument("--jpeg-quality", type=int, help="JPEG quality 1-95")


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(levelname)s: %(message)s")
    overrides = [f"{name}={getattr(args, name)}" for name in _FIELD_FLAGS if getattr(args, name) is not None]
    if args.no_header:
        overrides.append("header=false")
    cfg = load_config(RenderConfig, args.config, list(args.set) + overrides)
    source = SAMPLE_PTBXL if args.input == "sample" and not Path("sample").exists() else Path(args.input)
    try:
        exclude = read_id_list(args.exclude_ids) if args.exclude_ids else frozenset()
        summary = render_dataset(source, args.out, cfg, args.workers, args.limit, args.vary, args.seed,
                                 rate=args.rate, exclude_ids=exclude)
    except InputError as e:
        print(f"dist-cardio render: error: {e}", file=sys.stderr)
        return 2
    rate = summary["written"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    print(f"rendered {summary['written']}, kept {summary['skipped']} already present, failed {summary['failed']} "
          f"in {summary['seconds']:.1f} s ({rate:.1f} images/s) → {args.out / 'labels.csv'}")
    return 1 if summary["failed"] and not summary["written"] + summary["skipped"] else 0
