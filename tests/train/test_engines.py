"""The two engines: same loss sequence for the same seed on 2 real gloo ranks; state round trips; refusals."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from dist_cardio.config import ConfigError
from dist_cardio.distributed import DistInfo, run_local_processes
from dist_cardio.train.engines import EngineConfig, build_engine
from dist_cardio.train.gradcache import cached_contrastive_step
from dist_cardio.train.lars import LarsConfig, build_lars
from dist_cardio.train.losses import LossConfig, make_loss
from dist_cardio.model import SimCardioNet, preset
from dist_cardio.train.schedule import warmup_cosine

BATCH, STEPS, CHUNK = 8, 6, 6  # per rank; chunk 6 of 16 images → gradient caching with 3 chunks


def _views(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.rand(BATCH, 3, 64, 64, generator=g)
    return x, (x + 0.1 * torch.randn(x.shape, generator=g)).flip(-1)


def _train(engine, rank: int, steps: range, lrs) -> list[float]:
    loss_fn = make_loss(LossConfig())
    losses = []
    for step in steps:
        v1, v2 = _views(rank, step)
        engine.set_lr(lrs[step])
        loss = cached_contrastive_step(engine.model, engine.prepare(v1), engine.prepare(v2), CHUNK, loss_fn,
                                       engine.backward, engine.no_sync)
        engine.step()
        losses.append(float(loss))
    return losses


def _fresh(info: DistInfo, backend: str, precision: str = "fp32"):
    torch.manual_seed(0)
    model = SimCardioNet(preset("tiny"))  # dropout 0.1: the RNG must line up too
    engine = build_engine(EngineConfig(backend=backend, precision=precision), model, build_lars(model, LarsConfig()), info, BATCH)
    torch.manual_seed(100 + info.rank)
    return engine


def _both_engines(info: DistInfo) -> dict:
    lrs = warmup_cosine(1.0, STEPS, 2, 0.0)
    result = {}
    for backend in ("deepspeed", "accelerate"):
        engine = _fresh(info, backend)
        result[backend] = torch.tensor(_train(engine, info.rank, range(STEPS), lrs))
        result[backend + "_weights"] = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    return result


def test_deepspeed_and_accelerate_give_the_same_losses_on_two_ranks():
    ranks = run_local_processes(_both_engines, 2, timeout_s=600)
    for r in ranks:
        assert torch.allclose(r["deepspeed"], r["accelerate"], rtol=0, atol=1e-5), (r["deepspeed"], r["accelerate"])
        assert torch.allclose(r["deepspeed_weights"], r["accelerate_weights"], rtol=0, atol=1e-5)
        assert not torch.equal(r["deepspeed"][0], r["deepspeed"][-1])  # it trained
    # the replicas stayed identical across ranks (one all-reduce per step, same update everywhere)
    assert torch.equal(ranks[0]["deepspeed_weights"], ranks[1]["deepspeed_weights"])
    assert torch.equal(ranks[0]["accelerate_weights"], ranks[1]["accelerate_weights"])


def _layouts(info: DistInfo) -> dict:
    """Each engine with contiguous and with channels-last inputs (the CUDA default), and the stem conv's output layout."""
    lrs = warmup_cosine(1.0, 4, 1, 0.0)
    result = {}
    for backend, precision in LAYOUT_RUNS:
        for layout in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            model = SimCardioNet(preset("tiny"))
            seen: list[bool] = []
            stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            stem.register_forward_hook(lambda m, i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
            cfg = EngineConfig(backend=backend, precision=precision, memory_format=layout)
            engine = build_engine(cfg, model, build_lars(model, LarsConfig()), info, BATCH)
            torch.manual_seed(100 + info.rank)
            result[f"{backend}/{precision}/{layout}"] = torch.tensor(_train(engine, info.rank, range(4), lrs))
            result[f"{backend}/{precision}/{layout}/conv_channels_last"] = torch.tensor(seen)
    return result


LAYOUT_RUNS = [("deepspeed", "fp32"), ("deepspeed", "bf16"), ("accelerate", "fp32")]


@pytest.mark.slow
def test_channels_last_trains_like_contiguous_on_both_engines():
    """The CUDA layout on 2 gloo ranks: DeepSpeed's parameter broadcast and DDP's buckets accept it, the
    convolutions really run channels-last, and the losses are those of contiguous inputs."""
    for r in run_local_processes(_layouts, 2, timeout_s=600):
        for backend, precision in LAYOUT_RUNS:
            key = f"{backend}/{precision}"
            torch.testing.assert_close(r[f"{key}/channels_last"], r[f"{key}/contiguous"], rtol=2e-3 if precision == "bf16" else 1e-5, atol=0)
            assert r[f"{key}/channels_last/conv_channels_last"].all(), key
            assert not r[f"{key}/contiguous/conv_channels_last"].any(), key


def _state_round_trip(info: DistInfo, backend: str, precision: str) -> dict:
    """Train 2 steps, save through a weights_only file, train 2 more; a fresh engine loading it must match."""
    lrs = warmup_cosine(1.0, 4, 1, 0.0)
    engine = _fresh(info, backend, precision)
    first = _train(engine, info.rank, range(2), lrs)
    buffer = io.BytesIO()
    torch.save({**engine.state_dict(), "rng": torch.get_rng_state()}, buffer)
    straight = _train(engine, info.rank, range(2, 4), lrs)
    restored = _fresh(info, backend, precision)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    restored.load_state_dict(state)
    torch.set_rng_state(state["rng"])
    resumed = _train(restored, info.rank, range(2, 4), lrs)
    return {"first": torch.tensor(first), "straight": torch.tensor(straight), "resumed": torch.tensor(resumed),
            "dtype": str(next(engine.module.parameters()).dtype), "weights_dtype": str(state["model"]["projector.0.weight"].dtype)}


ROUND_TRIPS = [("deepspeed", "fp32"), ("accelerate", "fp32"), ("deepspeed", "bf16")]


def _all_round_trips(info: DistInfo) -> list[dict]:
    return [_state_round_trip(info, backend, precision) for backend, precision in ROUND_TRIPS]


def test_engine_state_round_trips_through_a_weights_only_file():
    (results,) = run_local_processes(_all_round_trips, 1, timeout_s=300)
    for (backend, precision), r in zip(ROUND_TRIPS, results):
        assert torch.equal(r["straight"], r["resumed"]), (backend, precision, r["straight"], r["resumed"])
        assert torch.isfinite(r["first"]).all()
        assert r["weights_dtype"] == "torch.float32"  # checkpoints hold fp32 weights whatever the compute dtype
        assert r["dtype"] == ("torch.bfloat16" if precision == "bf16" and backend == "deepspeed" else "torch.float32")


def _one_deepspeed_step(info: DistInfo) -> float:
    return _train(_fresh(info, "deepspeed"), info.rank, range(1), [0.1])[0]


def test_a_single_process_does_not_compile_deepspeeds_shared_memory_op(tmp_path, monkeypatch):
    # DeepSpeed compiles its CPU all-reduce op (g++, 26-45 s) into TORCH_EXTENSIONS_DIR on first use; one
    # process has nothing to reduce, so a fresh extensions folder must stay without it.
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    (loss,) = run_local_processes(_one_deepspeed_step, 1, timeout_s=300)
    assert torch.isfinite(torch.tensor(loss))
    assert not list(extensions.rglob("*.so")) and not list(extensions.rglob("*.o"))


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_1_2_with_lars_is_refused(stage):
    from dist_cardio.train.engines.deepspeed_engine import DeepSpeedEngine

    model = SimCardioNet(preset("tiny"))
    info = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match=rf"ZeRO stage {stage} with LARS is refused.*per-layer trust ratio"):
        DeepSpeedEngine(EngineConfig(zero_stage=stage), model, build_lars(model, LarsConfig()), info, BATCH)


def test_engine_config_validates():
    with pytest.raises(ValueError, match="zero_stage must be 0, 1 or 2"):
        EngineConfig(zero_stage=3)
    with pytest.raises(ValueError, match="deepspeed backend only"):
        EngineConfig(backend="accelerate", zero_stage=1)
    assert EngineConfig().resolved_precision(torch.device("cpu")) == "fp32"
    assert EngineConfig().resolved_precision(torch.device("cuda", 0)) == "bf16"
    assert EngineConfig().resolved_memory_format(torch.device("cpu")) == torch.contiguous_format
    assert EngineConfig().resolved_memory_format(torch.device("cuda", 0)) == torch.channels_last
    assert EngineConfig(memory_format="channels_last").resolved_memory_format(torch.device("cpu")) == torch.channels_last


def test_pretrain_config_refuses_zero_1_with_lars_at_load_time(tmp_path):
    from dist_cardio.train.pretrain import load_pretrain_config

    with pytest.raises(ConfigError, match="ZeRO stage 1 with LARS is refused"):
        load_pretrain_config(Path(__file__).resolve().parents[2] / "configs/pretrain/tiny.yaml", ["engine.zero_stage=1"])
