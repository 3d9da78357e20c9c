"""`dist-cardio submit pretrain|finetune`: queue pretraining (one multi-node job) or per-hospital
fine-tuning (a job array) on SLURM through submitit; `--local` runs the same job on this machine and
`--dry-run` prints the sbatch script and the resolved config without submitting."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from launchers.records import DEFAULT_JOB_FOLDER
from launchers.slurm import LaunchError, SlurmResources


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    pre = sub.add_parser("pretrain", help="one SLURM job for contrastive pretraining, one task per GPU",
                         description="One SLURM job, one task per GPU (or --tasks-per-node CPU tasks); "
                                     "requeues itself at the time limit and resumes from its latest checkpoint.")
    pre.add_argument("--config", type=Path, required=True, help="pretraining YAML (e.g. configs/pretrain/cpu-small.yaml)")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a pretraining config field")
    pre.add_argument("--max-requeues", type=int, default=3,
                     help="how many times the job may requeue itself at its time limit (default 3)")
    _resources(pre, gpus_help="GPUs per node, one task each (0: CPU tasks with gloo)", multi_node=True)
    _common(pre)

    fin = sub.add_parser("finetune", help="one single-node job per hospital, as a job array",
                         description="Fine-tune one checkpoint at every hospital of a hospitals.yaml "
                                     "(hospitals: [{name, data, config?, set?}]); a summary table lists them all.")
    fin.add_argument("--checkpoint", type=Path, required=True, help="pretrained checkpoint to start from")
    fin.add_argument("--hospitals", type=Path, required=True, help="hospitals.yaml")
    fin.add_argument("--config", type=Path, help="fine-tuning YAML for hospitals that name none")
    fin.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a fine-tuning field for every hospital (a hospital's own `set` wins)")
    fin.add_argument("--out", type=Path, default=Path("runs/finetune"),
                     help="one folder per hospital and the summary go here (default runs/finetune)")
    fin.add_argument("--array-parallelism", type=int, default=4, help="hospitals running at once (default 4)")
    _resources(fin, gpus_help="GPUs for each hospital's job: 0 or 1", multi_node=False)
    _common(fin)


def _resources(p: argparse.ArgumentParser, gpus_help: str, multi_node: bool) -> None:
    g = p.add_argument_group("SLURM resources")
    if multi_node:
        g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
        g.add_argument("--tasks-per-node", type=int, help="CPU tasks per node when --gpus-per-node is 0 (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help=gpus_help)
    g.add_argument("--cpus-per-task", type=int, help="CPUs per task (data loading workers + 1)")
    g.add_argument("--partition", help="partition (default: the cluster's default)")
    g.add_argument("--time", default="01:00:00", help="time limit, SLURM syntax (default 01:00:00)")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--constraint", help="node features, e.g. a100")
    g.add_argument("--mem", help="memory per node, e.g. 64G (default: the cluster's)")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--job-name", default="dist-cardio", help="SLURM job name")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", type=Path, default=DEFAULT_JOB_FOLDER,
                   help=f"job folder: one record, logs and pickles per submission (default {DEFAULT_JOB_FOLDER})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true",
                       help="run the same job here with submitit's local executor (no SLURM) and wait for it")
    where.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) to end and print the outcome")


def run(args: argparse.Namespace) -> int:
    command = shlex.join(["dist-cardio", *sys.argv[1:]])
    try:
        res = SlurmResources(
            nodes=getattr(args, "nodes", 1), gpus_per_node=args.gpus_per_node,
            tasks_per_node=getattr(args, "tasks_per_node", None), cpus_per_task=args.cpus_per_task,
            partition=args.partition, time=args.time, account=args.account, qos=args.qos,
            constraint=args.constraint, mem=args.mem, exclusive=args.exclusive, job_name=args.job_name,
        )
    except ValueError as e:
        return _error(str(e))
    try:
        if args.what == "pretrain":
            from launchers.pretrain_job import submit_pretrain

            return submit_pretrain(args.config, args.set, res, args.folder, max_requeues=args.max_requeues,
                                   local=args.local, dry_run=args.dry_run, wait=args.wait, command=command)
        from launchers.finetune_array import submit_finetune

        return submit_finetune(args.hospitals, args.checkpoint, args.config, args.set, args.out, res, args.folder,
                               array_parallelism=args.array_parallelism, local=args.local, dry_run=args.dry_run,
                               wait=args.wait, command=command)
    except LaunchError as e:
        return _error(str(e))


def _error(message: str) -> int:
    print(f"dist-cardio submit: error: {message}", file=sys.stderr)
    return 2
