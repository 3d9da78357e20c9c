"""The one owner of ``torch.distributed``: process-group setup, rank helpers, gather with gradient.

Launchers recognised, in this order: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``), SLURM tasks started by ``srun``/submitit (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``; the master is the first host of the step's node list, the port is derived from the job
id), or none (one process, no process group unless asked for). Under SLURM the torchrun variables are
exported too, so DeepSpeed and Accelerate see the same ranks. Nothing else in the project calls
``init_process_group``; every helper here also works, as a no-op, without a process group.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue as queue_module
import re
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as fc

STOPPED_EXIT = 143
"""Exit status of a process stopped by SIGTERM (128 + 15): the run saved ``latest``; requeue it."""


def rendezvous_port(job_id: str | int) -> int:
    """The port every task of one job derives from the job id (different jobs on a node rarely collide)."""
    return 15000 + int(job_id) % 20000



@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ranks, its device and the backend (None without a process group)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """Ranks and rendezvous address as read from a launcher's environment variables."""

    launcher: str  # "torchrun" | "slurm"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


_INFO: DistInfo | None = None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list (``gpu[01-03,07],login1``) into host names, as ``scontrol show hostnames``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [host for item in items if item.strip() for host in _expand_item(item.strip())]


def _expand_item(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    values = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if sep:  # zero padding follows the lower bound, as SLURM does
            values.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        else:
            values.append(part)
    return [host for v in values for host in _expand_item(prefix + v + suffix)]


def launch_env(environ: Mapping[str, str]) -> LaunchEnv | None:
    """Read the launcher's variables from ``environ``; None when no multi-process launcher is present."""
    try:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return LaunchEnv(
                "torchrun", int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")),
                environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", "29500")),
            )
        tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
        if "SLURM_PROCID" in environ and tasks:
            nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            addr = environ.get("MASTER_ADDR") or expand_nodelist(nodes)[0]
            # Every task of a job derives the same port; different jobs on one node rarely collide.
            port = int(environ.get("MASTER_PORT") or rendezvous_port(environ.get("SLURM_JOB_ID", "0")))
            return LaunchEnv(
                "slurm", int(environ["SLURM_PROCID"]), int(tasks), int(environ.get("SLURM_LOCALID", "0")), addr, port
            )
    except ValueError as e:
        raise ValueError(f"launcher environment variables are not integers ({e}); check RANK/WORLD_SIZE or SLURM_* variables") from None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, *, require_group: bool = False, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the launcher's environment (idempotent).

    ``backend`` defaults to nccl when CUDA is available, else gloo. Each process uses ``cuda:LOCAL_RANK``
    (or the CPU). Without a launcher there is one process and no group, unless ``require_group`` (DeepSpeed
    needs a group even alone: a 1-process group on a free localhost port is created).
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    env = launch_env(os.environ)
    if dist.is_initialized():  # joined by another library earlier: describe it, do not re-join
        local = int(os.environ.get("LOCAL_RANK", "0"))
        _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), local, _device(local), dist.get_backend())
        return _INFO
    if env is None and not require_group:
        _INFO = DistInfo(0, 1, 0, _device(0), None)
        return _INFO
    if env is None:
        env = LaunchEnv("none", 0, 1, 0, "127.0.0.1", _free_port())
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} outside world size {env.world_size} (check the launcher's environment)")
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                       ("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port)):
        os.environ.setdefault(key, str(value))
    device = _device(env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    _INFO = DistInfo(env.rank, env.world_size, env.local_rank, device, backend)
    return _INFO


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cleanup() -> None:
    """Leave the process group (if any); a later :func:`init_distributed` starts afresh."""
    global _INFO
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


def is_initialized() -> bool:
    """Whether a process group exists (single-process runs usually have none)."""
    return dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new detached tensor (for logging losses and metrics)."""
    out = t.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def all_gather_object(value: Any) -> list[Any]:
    """``value`` (any picklable object) from every rank, in rank order; ``[value]`` without a group."""
    if get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t [B, ...]`` from every rank along dim 0 → ``[world·B, ...]``, rank order.

    Gradients flow back to every rank: the backward sums, over ranks, the gradients of each rank's
    gathered copy and hands each rank its own slice. Every rank must pass the same shape.
    """
    if get_world_size() == 1:
        return t
    out = fc.all_gather_single_autograd(t.contiguous(), 0, dist.group.WORLD)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def run_local_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """Run ``fn(info: DistInfo, *args)`` in ``world_size`` fresh local processes joined by gloo.

    For tests and CPU runs without a launcher: each process gets torchrun-style variables (a free port,
    ``OMP_NUM_THREADS=1``), calls :func:`init_distributed` and :func:`cleanup`. ``fn`` must be importable
    (module level). Returns the ranks' return values (tensors, numbers, strings, lists and dicts of them) in rank
    order; a rank's exception or the timeout raises RuntimeError with the rank's traceback.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_local_worker, args=(fn, rank, world_size, port, args, queue)) for rank in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            try:
                rank, error, payload = queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue_module.Empty:
                raise RuntimeError(f"local processes timed out after {timeout_s:.0f} s (ranks done: {sorted(results)})") from None
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[r] for r in range(world_size)]


def _local_worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        info = init_distributed()
        try:
            result = fn(info, *args)
        finally:
            cleanup()
        buffer = io.BytesIO()
        torch.save(result, buffer)  # bytes, not shared-memory tensors: the process exits right after
        queue.put((rank, None, buffer.getvalue()))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))


__all__ = [
    "DistInfo", "LaunchEnv", "init_distributed", "cleanup", "launch_env", "expand_nodelist", "is_initialized", "get_rank",
    "get_world_size", "is_main", "barrier", "all_reduce_mean", "all_gather_object", "all_gather_with_grad",
    "run_local_processes",
]
