"""lars.py: the update formula by hand over several steps, param grouping, state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_cardio.train.lars import LARS, LarsConfig, build_lars, lars_param_groups
from dist_cardio.model import PRESETS, SimCardioNet


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.ones(3))  # 1-D, no telling name
        self.conv = nn.Conv2d(1, 2, 2)


def _grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_param_groups_by_pattern_and_1d_rule():
    m = Tiny()
    groups = lars_param_groups(m, exclude=["*.bias", "*norm*"], weight_decay=0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    adapted = sorted(names[id(p)] for p in groups[0]["params"])
    excluded = sorted(names[id(p)] for p in groups[1]["params"])
    assert adapted == ["conv.weight", "fc.weight"]
    assert excluded == ["conv.bias", "fc.bias", "norm.bias", "norm.weight", "scale"]
    assert (groups[0]["weight_decay"], groups[0]["lars_adapt"], groups[1]["weight_decay"], groups[1]["lars_adapt"]) == (0.1, True, 0.0, False)
    # without the 1-D rule only the patterns decide
    loose = lars_param_groups(m, exclude=["*norm*"], weight_decay=0.1, exclude_1d=False)
    assert sorted(names[id(p)] for p in loose[1]["params"]) == ["norm.bias", "norm.weight"]


def test_model_names_make_patterns_alone_sufficient():
    m = SimCardioNet(PRESETS["tiny"])
    by_pattern = lars_param_groups(m, exclude_1d=False)
    by_both = lars_param_groups(m)
    assert [len(g["params"]) for g in by_pattern] == [len(g["params"]) for g in by_both]
    assert all(p.ndim > 1 for p in by_both[0]["params"])


def test_updates_follow_the_formula_by_hand():
    torch.manual_seed(0)
    model = Tiny().double()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    mu = {n: torch.zeros_like(p) for n, p in ref.items()}
    lr, wd, mom, eta = 0.5, 0.01, 0.9, 0.002
    opt = LARS(lars_param_groups(model, ["*.bias", "*norm*"], wd), lr=lr, momentum=mom, trust_coefficient=eta)
    adapted = {"fc.weight", "conv.weight"}
    for step in range(4):
        _grads(model, step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for n in ref:
            if n in adapted:
                u = grads[n] + wd * ref[n]
                u = u * (eta * ref[n].norm() / u.norm())
            else:
                u = grads[n]  # no decay, no adaptation
            mu[n] = mom * mu[n] + u
            ref[n] = ref[n] - lr * mu[n]
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-12, atol=1e-14, msg=f"{n} at step {step}")


def test_zero_weights_fall_back_to_plain_sgd_step():
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.full((2, 2), 2.0, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.2, dtype=torch.float64))


def test_parameters_without_grad_are_skipped():
    m = Tiny()
    m.fc.weight.requires_grad_(False)
    before = m.fc.weight.detach().clone()
    opt = build_lars(m, LarsConfig(), lr=0.1)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(m.fc.weight, before)
    assert not torch.equal(m.conv.weight.detach(), torch.zeros_like(m.conv.weight))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    a = Tiny()
    opt_a = build_lars(a, LarsConfig(weight_decay=1e-3), lr=0.3)
    for step in range(2):
        _grads(a, step)
        opt_a.step()
    b = copy.deepcopy(a)
    opt_b = build_lars(b, LarsConfig(weight_decay=1e-3), lr=0.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["lr"] == 0.3 and opt_b.param_groups[1]["lars_adapt"] is False
    for step in range(2, 5):
        _grads(a, step)
        _grads(b, step)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="trust_coefficient"):
        LarsConfig(trust_coefficient=0.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.zeros(1))], momentum=1.0)
