"""The fine-tuning stages' LR is the shared precomputed cosine, step for step what the LambdaLR gave."""

from __future__ import annotations

import math

import pytest
import torch

from dist_cardio.downstream.finetune_loop import _StageLR


@pytest.mark.parametrize("total_steps", [1, 2, 7, 60])
def test_stage_lr_matches_the_former_lambdalr(total_steps):
    def optimizer():
        params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
        return torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 5e-4}])

    old_opt, new_opt = optimizer(), optimizer()
    # What finetune.py used before the one schedule: a LambdaLR stepped after every optimizer step.
    old = torch.optim.lr_scheduler.LambdaLR(
        old_opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    new = _StageLR(new_opt, total_steps)
    for _ in range(total_steps + 2):  # a few past the end too (LambdaLR clamps there)
        for g_old, g_new in zip(old_opt.param_groups, new_opt.param_groups):
            assert g_new["lr"] == pytest.approx(g_old["lr"], rel=1e-12, abs=1e-18)
        old_opt.step(); new_opt.step()
        old.step(); new.advance()


def test_stage_warmup_ramps_each_group_from_its_own_base_lr():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 5e-4}])
    lr = _StageLR(opt, total_steps=10, warmup_steps=4)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        lr.advance()
    assert [s[0] for s in seen[:4]] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a == pytest.approx(2 * b) for a, b in seen)  # the groups keep their ratio (discriminative LRs)
    assert seen[4][0] == pytest.approx(1e-3) and seen[-1][0] < seen[5][0]  # then the cosine decays


def test_stage_config_refuses_a_warmup_that_is_not_a_share():
    from dist_cardio.downstream.finetune import StageConfig

    with pytest.raises(ValueError, match="warmup"):
        StageConfig(epochs=2, lr=1e-3, warmup=1.0)
