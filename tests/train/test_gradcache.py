"""gradcache.py: cached gradients equal full-batch gradients (dropout on), 1 process and 2 gloo ranks, and
the real pretraining loop at batch 256 with gradient caching equals the same run in one forward."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cardio.distributed import DistInfo, all_reduce_mean, run_local_processes
from dist_cardio.model import SimCardioNet, preset
from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.train.gradcache import cached_contrastive_step
from dist_cardio.train.losses import hybrid_loss

LOSS = functools.partial(hybrid_loss, temperature=0.2, cos_weight=0.5)


def _net(dropout: float, norm: str = "group") -> nn.Module:
    torch.manual_seed(0)
    return SimCardioNet(preset("tiny", dropout=dropout, norm=norm)).double()


def _views(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 64, 64)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _chunked_with_graph(model: nn.Module, v1, v2, chunk: int, loss_fn) -> torch.Tensor:
    """Reference: the whole batch in one autograd graph, forwarded chunk by chunk (same RNG draws)."""
    z = torch.cat([model(c) for c in torch.cat([v1, v2]).split(chunk)])
    loss = loss_fn(z[: len(v1)], z[len(v1):])
    loss.backward()
    return loss.detach()


def _assert_same_grads(got: dict, ref: dict, rtol: float = 1e-9) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=1e-12, msg=name)


def test_dropout_gradients_equal_the_full_graph_and_rng_ends_in_place():
    v1, v2 = _views(5)
    ref_model, model = _net(0.2).train(), _net(0.2).train()
    torch.manual_seed(7)
    ref_loss = _chunked_with_graph(ref_model, v1, v2, 4, LOSS)
    ref_rng = torch.get_rng_state()
    torch.manual_seed(7)
    loss = cached_contrastive_step(model, v1, v2, chunk_size=4, loss_fn=LOSS)  # 10 images → chunks 4, 4, 2
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    _assert_same_grads(_grads(model), _grads(ref_model))


def test_without_dropout_equals_one_forward_of_the_whole_batch_and_differs_from_accumulation():
    v1, v2 = _views(6)
    full, cached, accumulated = _net(0.0), _net(0.0), _net(0.0)
    z = full(torch.cat([v1, v2]))
    LOSS(z[:6], z[6:]).backward()
    cached_contrastive_step(cached, v1, v2, chunk_size=3, loss_fn=LOSS)
    _assert_same_grads(_grads(cached), _grads(full))
    # plain gradient accumulation over micro-batches optimises another objective (fewer negatives)
    for a, b in zip(v1.split(3), v2.split(3)):
        (LOSS(accumulated(a), accumulated(b)) / 2).backward()
    assert not torch.allclose(_grads(accumulated)["backbone.stem.conv1.weight"], _grads(full)["backbone.stem.conv1.weight"], rtol=1e-3)


def test_large_chunk_is_a_plain_step():
    v1, v2 = _views(3)
    plain, cached = _net(0.0), _net(0.0)
    z = plain(torch.cat([v1, v2]))
    ref = LOSS(z[:3], z[3:])
    ref.backward()
    calls = []
    loss = cached_contrastive_step(cached, v1, v2, chunk_size=64, loss_fn=LOSS, backward=lambda t: (calls.append(1), t.backward()))
    assert len(calls) == 1
    torch.testing.assert_close(loss, ref.detach())
    _assert_same_grads(_grads(cached), _grads(plain))


def test_batchnorm_uses_chunk_statistics_and_updates_running_stats_once():
    v1, v2 = _views(4)
    ref_model, model = _net(0.0, "batch").train(), _net(0.0, "batch").train()
    _chunked_with_graph(ref_model, v1, v2, 4, LOSS)
    calls = []
    cached_contrastive_step(model, v1, v2, chunk_size=4, loss_fn=LOSS, backward=lambda t: (calls.append(1), t.backward()),
                            no_sync=lambda: _Counting(calls))
    assert calls == ["no_sync", 1, 1]  # 2 chunks: the first under no_sync, one backward each
    _assert_same_grads(_grads(model), _grads(ref_model))
    for (name, a), b in zip(ref_model.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


class _Counting:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __enter__(self):
        self.calls.append("no_sync")

    def __exit__(self, *exc):
        return False


def test_bad_arguments():
    v1, v2 = _views(2)
    with pytest.raises(ValueError, match="chunk_size"):
        cached_contrastive_step(_net(0.0), v1, v2, 0, LOSS)
    with pytest.raises(ValueError, match="equal shapes"):
        cached_contrastive_step(_net(0.0), v1, v2[:1], 2, LOSS)


def _two_rank_step(info: DistInfo, v1: torch.Tensor, v2: torch.Tensor) -> dict:
    """On each rank: its half of the global batch; DDP + cached vs a hand-averaged full-graph reference."""
    per = v1.shape[0] // info.world_size
    rows = slice(info.rank * per, (info.rank + 1) * per)
    a, b = v1[rows], v2[rows]
    out = {}
    # dropout 0: compared in the parent with one process on the whole global batch
    ddp = DDP(_net(0.0))
    out["loss0"] = all_reduce_mean(cached_contrastive_step(ddp, a, b, 3, LOSS, no_sync=ddp.no_sync))
    out["grads0"] = {n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}
    # dropout 0.2: rank-dependent masks, so compare with the same masks under a full graph
    torch.manual_seed(100 + info.rank)
    ddp = DDP(_net(0.2))
    cached_contrastive_step(ddp, a, b, 3, LOSS, no_sync=ddp.no_sync)
    cached = {n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}
    torch.manual_seed(100 + info.rank)
    ref = _net(0.2)
    _chunked_with_graph(ref, a, b, 3, LOSS)
    for p in ref.parameters():  # what DDP does: average over ranks
        dist.all_reduce(p.grad)
        p.grad /= info.world_size
    out["dropout_cached"], out["dropout_ref"] = cached, _grads(ref)
    return out


@pytest.mark.timeout(240)
def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    v1, v2 = _views(8, seed=5)
    res = run_local_processes(_two_rank_step, 2, v1, v2)
    full = _net(0.0)
    z = full(torch.cat([v1, v2]))
    loss = LOSS(z[:8], z[8:])
    loss.backward()
    for r in range(2):
        torch.testing.assert_close(res[r]["loss0"], loss.detach(), rtol=1e-12, atol=1e-12)
        _assert_same_grads(res[r]["grads0"], _grads(full))
        _assert_same_grads(res[r]["dropout_cached"], res[r]["dropout_ref"])


# --- the real pretraining loop at a per-rank batch of 256 ---------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_the_large_batch_config_is_cpu_small_at_256_with_caching():
    from dist_cardio.train.pretrain import load_pretrain_config, make_plan

    pretrain = REPO / "configs" / "pretrain"
    large, small = load_pretrain_config(pretrain / "cpu-large-batch.yaml"), load_pretrain_config(pretrain / "cpu-small.yaml")
    for section in ("model", "augment", "loss", "optim", "engine"):
        assert getattr(large, section) == getattr(small, section), section
    assert (large.data.batch_size, large.grad_cache_chunk, small.grad_cache_chunk) == (256, 32, None)
    plan = make_plan(large, world_size=1, steps_per_epoch=10)
    assert plan.peak_lr == pytest.approx(0.075 * 256 ** 0.5) and plan.warmup_steps == large.steps // 10


def _pretrain(shards: Path, out: Path, chunk: str) -> None:
    """2 steps of `dist-cardio pretrain` with the tiny config at batch 256; dropout 0 so that the chunked and
    the one-forward runs draw no random numbers in the model (the views come from the loader's own seeds)."""
    sets = [f"data.shards={shards}", "data.batch_size=256", "steps=2", "log_every=1", "model.dropout=0.0",
            f"grad_cache_chunk={chunk}"]
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "dist_cardio.cli", "pretrain", "--config",
           str(REPO / "configs" / "pretrain" / "tiny.yaml"), "--out", str(out), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    described = "global batch 256 (256 per rank × 1 ranks)"
    assert described in result.stdout and f"{chunk if chunk != 'null' else 512} images per forward" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretraining_at_batch_256_with_chunks_of_32_equals_one_forward(shared_data, tmp_path):
    render_dataset(shared_data / "ptbxl-500", tmp_path / "rendered", RenderConfig(dpi=50, format="jpg"), limit=256)
    shards = tmp_path / "shards"
    shard_inputs([tmp_path / "rendered" / "images"], shards, ShardConfig(max_side=256, workers=1, progress=False))
    _pretrain(shards, tmp_path / "cached", "32")
    _pretrain(shards, tmp_path / "plain", "null")
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("cached", "plain")}
    assert [r["step"] for r in rows["cached"]] == [r["step"] for r in rows["plain"]] == [1, 2]
    for cached, plain in zip(rows["cached"], rows["plain"]):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert cached["spread"] == pytest.approx(plain["spread"], rel=1e-5)
    weights = {name: torch.load(tmp_path / name / "checkpoints" / "latest", map_location="cpu", weights_only=True)["model"]
               for name in ("cached", "plain")}
    for key, plain in weights["plain"].items():
        torch.testing.assert_close(weights["cached"][key], plain, rtol=1e-4, atol=1e-6, msg=key)
