"""`dist-cardio explain IMAGES... --checkpoint best.pt --out DIR`: Grad-CAM overlays and the shortcut audit.

Exit status 1 when any file was unreadable (as `predict`), so scripts notice.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_cardio.commands.arguments import DEVICES
from dist_cardio.downstream.gradcam import WARN_ABOVE, explain_files
from dist_cardio.downstream.page_input import image_files, reason_counts
from dist_cardio.downstream.predict import load_finetuned


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt of a fine-tuning run (or the run folder)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <name>.gradcam.png, audit.csv, audit.json")
    parser.add_argument("--target", help="class to explain (default: the predicted class)")
    parser.add_argument("--warn-above", type=float, default=WARN_ABOVE,
                        help="flag images with more than this share of attention outside the ECG grid (default %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model = load_finetuned(args.checkpoint, args.device)
    summary = explain_files(model, image_files(args.images), args.out, args.target, args.warn_above,
                            progress=not args.no_progress)
    mean = summary["mean_outside_grid_share"]
    print(f"{summary['images']} overlays → {args.out}; attention outside the ECG grid: "
          f"{'n/a' if mean is None else f'{100 * mean:.1f}% on average'}, {len(summary['flagged'])} images above "
          f"{100 * args.warn_above:.0f}%")
    if summary["unreadable"]:  # counts only: names may name patients; audit.json (the user's own file) lists them
        reasons = reason_counts([item["reason"] for item in summary["unreadable"]])
        print(f"dist-cardio explain: {len(summary['unreadable'])} unreadable images ({reasons}); listed in "
              f"{args.out / 'audit.json'}", file=sys.stderr)
    return 1 if summary["unreadable"] else 0
