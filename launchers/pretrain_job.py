"""Pretraining as one SLURM job: one task per GPU (or CPU tasks), requeued at the time limit, resumed
from ``<out>/checkpoints/latest``. The job carries the resolved pretraining config, never options of
its own: what runs on the cluster is what ``--dry-run`` printed."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from submitit.core.utils import FailedJobError, UncompletedJobError

from dist_cardio.config import dump_yaml
from launchers.records import JobEntry, Submission, announce_submission, now, submission_folder
from launchers.requeue import RequeueingJob
from launchers.slurm import LaunchError, SlurmResources, check_request, ensure_writable, make_executor, sbatch_script


def submit_pretrain(config: Path, overrides: list[str], res: SlurmResources, root: Path, *, max_requeues: int,
                    local: bool, dry_run: bool, wait: bool, command: str) -> int:
    """Resolve the config, check the request, queue the job and leave its record; 0 when queued (or,
    with ``wait``/``local``, when it finished)."""
    from dist_cardio.train.pretrain import load_pretrain_config, run

    if max_requeues < 0:
        raise LaunchError(f"--max-requeues {max_requeues}: cannot be negative")
    cfg = load_pretrain_config(config, overrides)
    out = Path(cfg.out).resolve()
    folder = submission_folder(root, "pretrain")
    if dry_run:
        print(f"# sbatch script ({res.world_size} tasks, {res.backend}; submitit folder {folder})")
        print(sbatch_script(folder, res))
        print(f"# resolved pretraining config ({config}{' + ' + ' '.join(overrides) if overrides else ''})")
        print(dump_yaml(cfg))
        return 0
    check_request(res, local)
    ensure_writable(out, "output folder")
    ensure_writable(out / "checkpoints", "checkpoint folder")
    executor = make_executor(folder, res, local)
    job = executor.submit(RequeueingJob(functools.partial(run, cfg), max_requeues, cpu_only=res.gpus_per_node == 0))
    sub = Submission("pretrain", "local" if local else "slurm", str(folder), now(), command,
                     (JobEntry("pretrain", job.job_id, str(out)),))
    announce_submission(sub, f"pretraining job {job.job_id} ({res.world_size} tasks on {res.nodes} node(s))",
                        f"log {job.paths.stdout}; output {out}", root, follow=not (local or wait))
    if not (local or wait):
        return 0
    try:
        result = job.results()[0]
    except (FailedJobError, UncompletedJobError) as e:
        print(f"pretraining job {job.job_id} did not finish: {str(e).splitlines()[0]} (log: {job.paths.stderr})")
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0 if not result.get("interrupted") else 1


def describe_pretraining(out: Path) -> str:
    """One line for ``dist-cardio jobs``: the last step in the run's ``metrics.jsonl``."""
    metrics = out / "metrics.jsonl"
    for line in reversed(metrics.read_text().splitlines() if metrics.is_file() else []):
        try:  # the last line may be half-written while the job runs
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        return f"step {row['step']} loss {row['loss']:.4f}"
    return "no step logged yet"
