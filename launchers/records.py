"""One small JSON record per submission, kept in the job folder beside submitit's logs and pickles.

``dist-cardio jobs`` reads these records, so it needs neither the submitting shell nor SLURM's
memory of old jobs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dist_cardio.atomic import atomic_write_json
from dist_cardio.config import ConfigError, from_dict

RECORD_NAME = "job.json"
DEFAULT_JOB_FOLDER = Path("runs/jobs")


@dataclass(frozen=True)
class JobEntry:
    """One SLURM job (or array element) of a submission and the folder its run writes to."""

    name: str
    job_id: str
    out: str


@dataclass(frozen=True)
class Submission:
    """What was submitted, from where and when; ``folder`` holds submitit's pickles and logs."""

    kind: Literal["pretrain", "finetune"]
    executor: Literal["slurm", "local"]
    folder: str
    submitted_at: str
    command: str
    jobs: tuple[JobEntry, ...]
    summary_job_id: str | None = None
    """The job that writes the fine-tuning summary once every hospital has ended (SLURM only)."""


def submission_folder(root: Path, kind: str) -> Path:
    """A fresh folder name per submission: submitit keys its files by job id, and job ids restart
    when a cluster's state is wiped, so a shared folder could hand back another job's result."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root.resolve() / f"{stamp}-{kind}-{uuid.uuid4().hex[:6]}"


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def announce_submission(sub: Submission, what: str, details: str, root: Path, follow: bool) -> Path:
    """Save the record and print the one submission line both launchers print (and how to follow the jobs)."""
    record = save_submission(sub)
    print(f"submitted {what}; record {record}; {details}")
    if follow:
        print(f"follow {'them' if sub.kind == 'finetune' else 'it'} with: dist-cardio jobs --folder {root}")
    return record


def save_submission(sub: Submission) -> Path:
    path = Path(sub.folder) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dataclasses.asdict(sub), indent=2)
    return path


def load_submissions(root: Path) -> list[Submission]:
    """Every record under ``root``, oldest first; a damaged record is an error naming its file."""
    subs = []
    for path in sorted(root.glob(f"*/{RECORD_NAME}")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg}); delete this record or restore it") from None
        subs.append(from_dict(Submission, data, source=str(path)))
    return subs
