"""What a job asks SLURM for, checked against the cluster before anything is queued.

A wrong request (no SLURM here, a partition that does not exist, more GPUs than a node has) should fail
at submission in one line, not after hours in the queue. Every cluster query runs under a timeout:
SLURM's client commands block for minutes when the controller is down.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.slurm.slurm import _make_sbatch_string

QUERY_TIMEOUT_S = 15
# Seconds between SLURM's warning signal (USR2) and the end of the time limit: room to save a checkpoint.
SIGNAL_DELAY_S = 120

_TIME_FORMATS = (
    re.compile(r"^(?P<m>\d+)$"),
    re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
)
_MEM = re.compile(r"^\d+[KMGT]?$")
_GPU_GRES = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")


class LaunchError(RuntimeError):
    """A submission that cannot work as asked; the message is one line that says what to change."""


def parse_time(text: str) -> int:
    """SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) → whole minutes, rounded up."""
    for pattern in _TIME_FORMATS:
        m = pattern.match(text.strip())
        if m:
            parts = {k: int(v) for k, v in m.groupdict().items() if v is not None}
            seconds = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
            if seconds <= 0:
                break
            return math.ceil(seconds / 60)
    raise ValueError(f"time {text!r}: expected a SLURM time limit such as 30, 04:00:00 or 1-12:00:00")


@dataclass(frozen=True)
class SlurmResources:
    """One job's allocation; with GPUs it runs one task per GPU (srun tasks, not torchrun inside SLURM)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Defaults to ``gpus_per_node`` (one task per GPU), or 1 on CPU nodes."""
    cpus_per_task: int | None = None
    partition: str | None = None
    """None: the cluster's default partition."""
    time: str = "01:00:00"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    """Memory per node in SLURM's syntax (``64G``); None: the cluster's default."""
    exclusive: bool = False
    job_name: str = "dist-cardio"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes}: need at least 1 node")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node}: cannot be negative")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"--tasks-per-node {self.tasks_per_node}: need at least 1 task")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                "GPU jobs run one task per GPU; drop --tasks-per-node"
            )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task {self.cpus_per_task}: need at least 1 CPU")
        if self.mem is not None and not _MEM.match(self.mem):
            raise ValueError(f"--mem {self.mem!r}: expected SLURM memory such as 64G or 500M")
        if parse_time(self.time) * 60 <= SIGNAL_DELAY_S:
            raise ValueError(f"--time {self.time}: give the job more than {SIGNAL_DELAY_S} s (it is warned that long "
                             "before its limit, to save and requeue)")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus_per_node else "gloo"


def slurm_parameters(res: SlurmResources) -> dict:
    """``SlurmExecutor.update_parameters`` keywords for ``res`` (submitit's names, not sbatch's)."""
    params: dict = {
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.ntasks_per_node,
        "time": parse_time(res.time),
        "signal_delay_s": SIGNAL_DELAY_S,
    }
    optional = {
        "gpus_per_node": res.gpus_per_node or None,
        "cpus_per_task": res.cpus_per_task,
        "partition": res.partition,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
        "exclusive": res.exclusive or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if res.mem is not None:
        # submitit's own ``mem`` takes GB as a number; SLURM's syntax goes through verbatim
        params["additional_parameters"] = {"mem": res.mem}
    return params


def sbatch_script(folder: Path, res: SlurmResources, array_size: int | None = None, array_parallelism: int = 256) -> str:
    """The sbatch script submitit will write for this request (for ``--dry-run``; needs no SLURM).

    Built by submitit's own script writer (private in submitit 1.5.4, which the project pins), with the
    command ``SlurmExecutor`` runs, so what is printed is what would be queued.
    """
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = slurm_parameters(res)
    if array_size is not None:
        params.update(map_count=array_size, array_parallelism=array_parallelism)
    return _make_sbatch_string(command=command, folder=folder, **params)


def _query(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(cmd)}` gave no answer in {QUERY_TIMEOUT_S} s: is slurmctld up?") from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise LaunchError(f"`{' '.join(cmd)}` failed: {reason}")
    return out.stdout


def max_gpus_per_node(gres_lines: str) -> int:
    """Largest GPU count of any node configuration in ``sinfo -o %G`` output (``gpu:a100:8(S:0-1)``)."""
    best = 0
    for line in gres_lines.split():
        best = max(best, sum(int(n) for n in _GPU_GRES.findall(line)))
    return best


def check_cluster(res: SlurmResources) -> str:
    """Refuse what this cluster cannot run; returns the partition the job will go to."""
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found on PATH: this machine is not a SLURM login node "
            "(run the same job here with --local, or print the script with --dry-run)"
        )
    partitions = _query(["sinfo", "-h", "-o", "%P"]).split()
    names = [p.rstrip("*") for p in partitions]
    default = next((p.rstrip("*") for p in partitions if p.endswith("*")), None)
    partition = res.partition or default
    if partition is None:
        raise LaunchError(f"this cluster has no default partition: pass --partition (sinfo offers: {', '.join(names)})")
    if partition not in names:
        raise LaunchError(f"unknown partition {partition!r}: sinfo offers {', '.join(names) or 'none'}")
    if res.gpus_per_node:
        gres = _query(["sinfo", "-h", "-p", partition, "-o", "%G"])
        have = max_gpus_per_node(gres)
        if res.gpus_per_node > have:
            raise LaunchError(
                f"--gpus-per-node {res.gpus_per_node}: nodes of partition {partition!r} have at most {have} GPUs "
                f"(sinfo -o %G: {' '.join(gres.split()) or 'none'})"
            )
    return partition


def ensure_writable(path: Path, what: str) -> None:
    """Create ``path`` and prove a file can be written there, before a job finds out hours later."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise LaunchError(f"{path}: {what} is not writable ({e.strerror or e}); choose another folder") from None


def check_request(res: SlurmResources, local: bool) -> None:
    """What must hold before anything is written or queued: one machine for ``--local``, else a cluster
    that can run ``res``."""
    if local:
        if res.nodes != 1:
            raise LaunchError(f"--local runs on this one machine: use --nodes 1 (got {res.nodes})")
    else:
        check_cluster(res)


def make_executor(folder: Path, res: SlurmResources, local: bool, array_parallelism: int | None = None) -> submitit.Executor:
    """SLURM executor, or submitit's local executor for ``--local`` (named explicitly: AutoExecutor
    would pick SLURM wherever its client tools are installed). Call :func:`check_request` first."""
    if local:
        executor: submitit.Executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=parse_time(res.time),
            tasks_per_node=res.ntasks_per_node,
            gpus_per_node=res.gpus_per_node,
            signal_delay_s=SIGNAL_DELAY_S,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder)
    params = slurm_parameters(res)
    if array_parallelism is not None:
        params["array_parallelism"] = array_parallelism
    executor.update_parameters(**params)
    return executor
