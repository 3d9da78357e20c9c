"""`dist-cardio jobs [--folder DIR]`: the jobs submitted from a job folder, their state, requeues, progress, logs."""

from __future__ import annotations

import argparse
from pathlib import Path

from launchers.jobs import job_statuses
from launchers.records import DEFAULT_JOB_FOLDER
from launchers.table import format_table


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folder", type=Path, default=DEFAULT_JOB_FOLDER,
                        help=f"job folder given to `dist-cardio submit` (default: {DEFAULT_JOB_FOLDER})")


def run(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        raise NotADirectoryError(f"{args.folder}: no such job folder (submit a job first, or pass --folder)")
    rows = job_statuses(args.folder)
    if not rows:
        print(f"no submissions in {args.folder}")
        return 0
    header = ["submission", "job", "id", "state", "requeues", "progress", "log"]
    print(format_table(header, [[r.submission, r.name, r.job_id, r.state, str(r.requeues), r.progress, r.log]
                                for r in rows]))
    return 0
