"""distributed.py: launcher parsing (torchrun, SLURM), and real 2-process gloo collectives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_cardio import distributed as D
from dist_cardio.distributed import expand_nodelist, launch_env, run_local_processes


def test_expand_nodelist_like_scontrol():
    assert expand_nodelist("node1") == ["node1"]
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_nodelist("rack[1-2]-n[1,3]") == ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]


def test_launch_env_torchrun_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert launch_env(env) == D.LaunchEnv("torchrun", 3, 8, 1, "h0", 1234)


def test_launch_env_slurm_first_host_and_job_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[017-020]"}
    got = launch_env(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.master_addr) == ("slurm", 5, 8, 1, "gpu017")
    assert got.master_port == 15000 + 123456 % 20000
    # the step's own task count and node list take precedence over the allocation's
    step = launch_env(env | {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[019-020]"})
    assert (step.world_size, step.master_addr) == (4, "gpu019")
    assert launch_env(env | {"MASTER_PORT": "4321"}).master_port == 4321


def test_launch_env_none_and_bad_values():
    assert launch_env({}) is None
    assert launch_env({"SLURM_PROCID": "0"}) is None  # no task count: not a task of a step
    with pytest.raises(ValueError, match="not integers"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_single_process_helpers_without_group():
    assert not torch.distributed.is_initialized()
    t = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(t) is t
    assert torch.equal(D.all_reduce_mean(t), t.detach())
    assert D.is_main() and D.get_world_size() == 1 and not D.is_initialized()
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    D.barrier()


def test_init_without_launcher_then_with_required_group():
    """Run in a clean interpreter: no launcher → no group; require_group → a real 1-process gloo group."""
    code = textwrap.dedent("""
        import torch.distributed as dist
        from dist_cardio import distributed as D
        info = D.init_distributed()
        assert (info.rank, info.world_size, info.backend, info.device.type) == (0, 1, None, "cpu"), info
        assert D.init_distributed() is info and not dist.is_initialized()
        D.cleanup()
        info = D.init_distributed(require_group=True)
        assert dist.is_initialized() and info.backend == "gloo" and dist.get_world_size() == 1
        D.cleanup()
        assert not dist.is_initialized()
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def _collectives(info: D.DistInfo) -> dict:
    r = info.rank
    assert D.init_distributed() is info  # idempotent
    x = (torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r).requires_grad_()
    gathered = D.all_gather_with_grad(x)
    # a rank-specific upstream gradient, so the backward must combine what both ranks send
    weight = torch.arange(12, dtype=torch.float64).reshape(6, 2) * (r + 1)
    (gathered * weight).sum().backward()
    D.barrier()
    return {"gathered": gathered.detach(), "grad": x.grad, "mean": D.all_reduce_mean(torch.tensor(float(r) + 1.0)),
            "info": [info.rank, info.world_size, info.local_rank, info.backend], "main": D.is_main(),
            "objects": D.all_gather_object({"rank": r, "name": f"r{r}"}), "initialized": D.is_initialized()}


@pytest.mark.timeout(180)
def test_two_gloo_processes_gather_with_grad_and_mean():
    res = run_local_processes(_collectives, 2)
    full = torch.cat([torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r for r in range(2)])
    weight = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    for r in range(2):
        assert res[r]["info"] == [r, 2, r, "gloo"]
        assert res[r]["main"] == (r == 0)
        assert torch.equal(res[r]["gathered"], full)
        # d/dx_r of sum over ranks k of sum(gathered * weight * (k+1)) = weight[rank r rows] * (1 + 2)
        assert torch.equal(res[r]["grad"], 3 * weight[3 * r: 3 * r + 3])
        assert res[r]["mean"].item() == 1.5
        assert res[r]["objects"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}] and res[r]["initialized"]


def _fails_on_rank_one(info: D.DistInfo) -> None:
    if info.rank == 1:
        raise ValueError("boom on purpose")


@pytest.mark.timeout(180)
def test_run_local_processes_reports_a_rank_failure():
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*boom on purpose"):
        run_local_processes(_fails_on_rank_one, 2)
