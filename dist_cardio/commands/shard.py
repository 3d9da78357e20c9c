"""`dist-cardio shard INPUT... --out DIR`: images in folders/archives → deduplicated, incremental WebDataset shards."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dist_cardio.config import load_config
from dist_cardio.shard import ShardConfig, shard_inputs

# CLI flag → ShardConfig field; a flag given on the command line overrides --config and --set.
_FLAG_FIELDS = {"prefix": "prefix", "max_size": "max_size_mb", "max_count": "max_count", "max_side": "max_side",
                "labels": "labels", "workers": "workers", "max_member_size": "max_member_mb"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="folders, images, .zip/.tar/.tar.gz archives of JPG/PNG/BMP/TIFF (nested archives too)")
    parser.add_argument("--out", required=True, type=Path, help="shard set folder (created, or extended incrementally)")
    parser.add_argument("--labels", metavar="folders|CSV",
                        help="'folders': class = parent folder; or a CSV path,label[,extra columns → meta]; "
                             "'A;B' = multi-label")
    parser.add_argument("--workers", type=int, help="processes for hashing/validation (default: CPU cores, at most 8)")
    parser.add_argument("--max-size", type=float, metavar="MB", help="largest shard (default 1000 MB)")
    parser.add_argument("--max-count", type=int, metavar="N", help="most samples per shard (default 10000)")
    parser.add_argument("--max-side", type=int, metavar="N",
                        help="store a training-resolution copy: long side <= N px (JPEG stays JPEG q90, PNG stays PNG)")
    parser.add_argument("--prefix", help="shard file prefix (default 'shard': shard-000000.tar)")
    parser.add_argument("--max-member-size", type=float, metavar="MB", help="largest file/archive member read (default 256)")
    parser.add_argument("--config", type=Path, help="YAML file with ShardConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ShardConfig field")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    flags = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if args.no_progress:
        flags["progress"] = False
    try:
        cfg = dataclasses.replace(load_config(ShardConfig, args.config, args.set), **flags)
        s = shard_inputs(args.inputs, args.out, cfg)
    except ValueError as e:  # bad flag values, labels CSV, a folder in use, nested in an input, a full disk
        print(f"dist-cardio shard: error: {e}", file=sys.stderr)
        return 2
    for line in s["warnings"]:
        print(f"dist-cardio shard: warning: {line}", file=sys.stderr)
    print(format_summary(s))
    return 0


def format_summary(s: dict) -> str:
    """A few lines for people; file names of skipped inputs stay in skipped.jsonl (they may name patients)."""
    shards = s["shards"]
    written = f"{len(shards)} new shard(s)" + (f" ({shards[0]} … {shards[-1]})" if shards else "")
    lines = [f"added {s['added']} images in {written}; {s['duplicates']} duplicate(s), "
             f"{s['already_present']} already in the set, {s['skipped']} skipped ({s['seconds']:.1f} s)"]
    if s["skipped_kinds"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(s["skipped_kinds"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  skipped: {kinds} (details in {Path(s['out']) / 'skipped.jsonl'})")
    if s["unlabeled"]:
        lines.append(f"  {s['unlabeled']} added image(s) matched no label (label null)")
    if s["recovered"]:
        lines.append(f"  adopted {len(s['recovered'])} complete shard(s) left by a killed run")
    t = s["totals"]
    lines.append(f"  set: {t['samples']} samples in {t['shards']} shards, {t['bytes'] / 1e6:.1f} MB → {s['out']}")
    return "\n".join(lines)
