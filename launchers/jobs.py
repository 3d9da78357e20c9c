"""Where each submitted job stands: state and requeue count from ``sacct`` (accounting keeps one row per
run of a requeued job, long after the controller forgot it), progress from the run's own output folder."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from submitit.core.utils import JobPaths, pickle_load
from submitit.slurm.slurm import read_job_id

from launchers.finetune_array import describe_hospital
from launchers.pretrain_job import describe_pretraining
from launchers.records import load_submissions
from launchers.slurm import QUERY_TIMEOUT_S


@dataclass(frozen=True)
class JobStatus:
    submission: str
    name: str
    job_id: str
    state: str
    requeues: int
    progress: str
    log: str


def sacct_states(job_ids: list[str]) -> dict[str, tuple[str, int]]:
    """``job id → (current state, times requeued)``; empty where sacct cannot answer (no accounting)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-n", "-X", "-P", "--duplicates", "-o", "JobID,State"]
    for base in sorted({j.split("_")[0] for j in job_ids}):
        cmd += ["-j", base]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    states: dict[str, tuple[str, int]] = {}
    for line in out.stdout.splitlines():  # rows of one job come oldest first
        raw_id, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0" → CANCELLED
        for parts in read_job_id(raw_id):  # "12_[1-3]" → pending array elements 12_1..12_3
            ids = [parts[0]] if len(parts) == 1 else [f"{parts[0]}_{i}" for i in range(int(parts[1]), int(parts[-1]) + 1)]
            for jid in ids:
                requeues = states.get(jid, ("", 0))[1] + (state == "REQUEUED")
                states[jid] = (state, requeues)
    return states


def local_state(folder: Path, job_id: str) -> str:
    """State of a ``--local`` job: its result if written, else whether its controller process still runs."""
    result = JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    if result.exists():
        outcome, _ = pickle_load(result)
        return "COMPLETED" if outcome == "success" else "FAILED"
    try:
        os.kill(int(job_id), 0)
    except ProcessLookupError:
        return "ENDED"
    return "RUNNING"


def job_statuses(root: Path) -> list[JobStatus]:
    subs = load_submissions(root)
    states = sacct_states([j.job_id for s in subs if s.executor == "slurm" for j in s.jobs])
    rows = []
    for sub in subs:
        folder = Path(sub.folder)
        describe = describe_pretraining if sub.kind == "pretrain" else describe_hospital
        for job in sub.jobs:
            if sub.executor == "slurm":
                state, requeues = states.get(job.job_id, ("UNKNOWN", 0))
            else:
                state, requeues = local_state(folder, job.job_id), 0
            log = JobPaths(folder, job_id=job.job_id, task_id=0).stdout
            rows.append(JobStatus(folder.name, job.name, job.job_id, state, requeues, describe(Path(job.out)), str(log)))
    return rows
