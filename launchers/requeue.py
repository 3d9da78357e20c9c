"""A submitit job that SLURM may stop at any time and that continues where it stopped.

The payload (pretraining) saves and returns ``{"interrupted": True, ...}`` on SIGTERM and resumes by
itself from its latest checkpoint, so this wrapper only has to decide what happens after a stop:

- SLURM's warning before the time limit (``--signal=USR2@120``, also what submitit's ``job._interrupt()``
  sends): the payload is asked to stop as on SIGTERM, then rank 0 requeues the job
  (``scontrol requeue``), at most ``max_requeues`` times over the job's life (``SLURM_RESTART_COUNT``).
- SIGTERM alone (preemption, ``scontrol requeue``, ``scancel``): SLURM already decided whether the job
  runs again; the job exits without a result and requeues nothing (requeueing would revive a cancelled job).

submitit's own USR2 handler checkpoints and exits from inside the signal handler on rank 0 while the
other ranks are mid-step; replacing it lets every rank finish the step and save together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import submitit

REQUEUE_TIMEOUT_S = 60
# STOPPED_EXIT (128 + SIGTERM: no result pickle, SLURM decides what follows) and the rendezvous port come
# from dist_cardio.distributed, imported where used so that importing the launchers does not import torch.


class TimeLimitWarning:
    """Remembers submitit's warning signal and turns it into the payload's SIGTERM stop request."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = True
        os.kill(os.getpid(), signal.SIGTERM)


def export_local_torch_env(env: submitit.JobEnvironment) -> None:
    """torchrun's variables for the tasks of submitit's local executor (SLURM tasks need none:
    ``dist_cardio.distributed`` reads ``SLURM_PROCID`` and the node list itself)."""
    from dist_cardio.distributed import rendezvous_port

    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR="127.0.0.1",
        # every task of one job derives the same port from the job id (the controller's pid)
        MASTER_PORT=str(rendezvous_port(env.raw_job_id)),
    )


class RequeueingJob(submitit.helpers.Checkpointable):
    """Runs ``payload()`` in every task; requeues on the time-limit warning (see the module docstring).

    ``payload`` must return a dict with ``"interrupted": True`` when it stopped early after saving, and
    must resume by itself on the next run. Being ``Checkpointable``, a warning that arrives before this
    job has installed its handler still requeues the same job through submitit.
    """

    def __init__(self, payload: Callable[[], dict[str, Any]], max_requeues: int, cpu_only: bool = False) -> None:
        self.payload = payload
        self.max_requeues = max_requeues
        self.cpu_only = cpu_only

    def __call__(self) -> dict[str, Any]:
        from dist_cardio.distributed import STOPPED_EXIT

        env = submitit.JobEnvironment()
        if env.cluster == "local":
            export_local_torch_env(env)
        if self.cpu_only:  # --gpus-per-node 0 on a GPU node: CPU tasks, gloo
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        warning = TimeLimitWarning()
        result = self.payload()
        if not result.get("interrupted"):
            return result
        if not warning.received:
            print(f"stopped by SIGTERM at step {result.get('step')}; SLURM decides whether the job runs again", flush=True)
            sys.exit(STOPPED_EXIT)
        if env.cluster != "slurm":
            return result  # --local: nothing to requeue into; running the command again resumes
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            raise RuntimeError(
                f"job {env.job_id} reached its time limit after {restarts} requeues (--max-requeues "
                f"{self.max_requeues}); submit the same command again to continue from the latest checkpoint"
            )
        if env.global_rank == 0:
            subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=REQUEUE_TIMEOUT_S)
            print(f"requeued job {env.job_id} at step {result.get('step')} (restart {restarts + 1})", flush=True)
        sys.exit(STOPPED_EXIT)
