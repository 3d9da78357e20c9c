"""`dist-cardio verify DIR`: re-read a shard set (checksums, DALI indexes, every image); non-zero exit on problems."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_cardio.commands.arguments import at_least
from dist_cardio.shard import verify_shard_set


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="shard set folder (the --out of dist-cardio shard)")
    parser.add_argument("--no-decode", action="store_true",
                        help="structure checks only (markers, CRCs, headers), no pixel decode: much faster")
    parser.add_argument("--workers", type=at_least(0), default=0, metavar="N",
                        help="processes checking images (default 0: CPU cores, at most 8; 1: no worker processes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = verify_shard_set(args.directory, decode=not args.no_decode, progress=not args.no_progress,
                              workers=args.workers)
    print(report.text())
    return 0 if report.ok else 1
