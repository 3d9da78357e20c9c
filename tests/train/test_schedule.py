"""schedule.py (through pretrain.make_plan, as the trainer calls it): scaling rules, warmup + cosine shape, lengths, derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_cardio.data import LoaderConfig
from dist_cardio.train.pretrain import PretrainConfig, make_plan
from dist_cardio.train.schedule import ScheduleConfig, apply_lr, scaled_lr, warmup_cosine


def test_scaling_rules_use_the_global_batch():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(0.3 * 16)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    assert scaled_lr(0.1, 512, "none") == 0.1
    with pytest.raises(ValueError, match="scaling"):
        scaled_lr(0.1, 512, "cubic")
    with pytest.raises(ValueError, match="global batch"):
        scaled_lr(0.1, 0, "linear")


def test_warmup_then_cosine_to_final():
    s = warmup_cosine(peak_lr=2.0, total_steps=20, warmup_steps=5, final_lr=0.2)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], 2.0 * np.arange(1, 6) / 5)  # linear, reaching the peak at the last warmup step
    assert s[5] == pytest.approx(2.0) and s[-1] == pytest.approx(0.2)
    assert np.all(np.diff(s[5:]) < 0)  # strictly decaying after warmup
    mid = 5 + 7  # halfway through the 15 decay steps (progress 7/14)
    assert s[mid] == pytest.approx(0.2 + 0.5 * 1.8 * (1 + math.cos(math.pi * 0.5)))


def test_edge_lengths():
    assert warmup_cosine(1.0, 1, 0, 0.0).tolist() == [1.0]
    np.testing.assert_allclose(warmup_cosine(1.0, 4, 4, 0.0), [0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError):
        warmup_cosine(1.0, 3, 4, 0.0)


def _plan(schedule: ScheduleConfig, batch_size: int, world_size: int, steps_per_epoch: int, epochs: int):
    """The schedule exactly as the trainer derives it (``pretrain.make_plan``)."""
    cfg = PretrainConfig(data=LoaderConfig(batch_size=batch_size), schedule=schedule, epochs=epochs)
    return make_plan(cfg, world_size, steps_per_epoch)


def test_schedule_from_config_and_description_agree():
    cfg = ScheduleConfig(base_lr=0.3, scaling="linear", warmup_epochs=1.5, final_lr_ratio=0.01)
    d = _plan(cfg, batch_size=256, world_size=2, steps_per_epoch=10, epochs=4)
    s = d.lrs
    assert len(s) == d.total_steps == 40 and d.warmup_steps == 15
    assert d.peak_lr == pytest.approx(0.6) and s.max() == pytest.approx(0.6)
    assert s[-1] == pytest.approx(0.6 * cfg.final_lr_ratio) and s[-1] == pytest.approx(0.006)
    assert d.global_batch == 512
    # warmup longer than the run is clipped to the run
    assert _plan(ScheduleConfig(warmup_epochs=10), 256, 1, 3, 2).warmup_steps == 6


def test_apply_lr_sets_every_group():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 5.0}], lr=1.0)
    apply_lr(opt, np.float64(0.25))
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert type(opt.param_groups[0]["lr"]) is float


def test_config_validation():
    with pytest.raises(ValueError, match="final_lr_ratio"):
        ScheduleConfig(final_lr_ratio=1.5)
    with pytest.raises(ValueError, match="base_lr"):
        ScheduleConfig(base_lr=0.0)
