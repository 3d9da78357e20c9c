"""losses.py against a float64 loop reference, on 1 process and on 2 real gloo processes."""

from __future__ import annotations

import math

import pytest
import torch

from dist_cardio.distributed import DistInfo, all_reduce_mean, run_local_processes
from dist_cardio.train.losses import (
    DCLW_SIGMA, LossConfig, collapsed_loss, dcl, embedding_spread, hybrid_loss, make_loss, nt_xent,
)
from dist_cardio.train.runlog import collapse_warning


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's definition written as loops: mean over the 2N anchors of −log softmax of the positive."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    terms = []
    for i in range(n2):
        pos = (i + n) % n2
        sims = torch.stack([z[i] @ z[k] / t for k in range(n2) if k != i])
        terms.append(-(z[i] @ z[pos] / t) + torch.logsumexp(sims, dim=0))
    return torch.stack(terms).mean()


def reference_dcl(z1: torch.Tensor, z2: torch.Tensor, t: float, sigma: float | None = None) -> torch.Tensor:
    """Yeh et al. 2022 written as loops: NT-Xent's terms with the positive left out of the log-sum-exp;
    DCLW weights the positive by 2 − N·exp(cos_i/σ) / Σ_j exp(cos_j/σ) over the N pairs."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    cos = torch.stack([z[j] @ z[j + n] for j in range(n)])
    weights = 2 - n * torch.exp(cos / sigma) / torch.exp(cos / sigma).sum() if sigma else torch.ones(n, dtype=z.dtype)
    terms = []
    for i in range(n2):
        pos = (i + n) % n2
        negs = torch.stack([z[i] @ z[k] / t for k in range(n2) if k not in (i, pos)])
        terms.append(-weights[i % n] * (z[i] @ z[pos] / t) + torch.logsumexp(negs, dim=0))
    return torch.stack(terms).mean()


def reference_hybrid(z1, z2, t, lam):
    z1, z2 = z1.double(), z2.double()
    cos = (z1 * z2).sum(1) / (z1.norm(dim=1) * z2.norm(dim=1))
    return reference_nt_xent(z1, z2, t) + lam * (1 - cos).mean()


def _pair(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


LOSSES_AND_REFERENCES = {
    "nt_xent": (lambda z1, z2, t: nt_xent(z1, z2, t), reference_nt_xent),
    "dcl": (lambda z1, z2, t: dcl(z1, z2, t), lambda z1, z2, t: reference_dcl(z1, z2, t, None)),
    "dclw": (lambda z1, z2, t: dcl(z1, z2, t, sigma=DCLW_SIGMA), lambda z1, z2, t: reference_dcl(z1, z2, t, DCLW_SIGMA)),
}


@pytest.mark.parametrize("kind", sorted(LOSSES_AND_REFERENCES))
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_losses_match_their_reference_value_and_gradients(t, kind):
    loss_fn, reference = LOSSES_AND_REFERENCES[kind]
    a, b = _pair()
    z1, z2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = loss_fn(z1, z2, t)
    loss.backward()
    r1, r2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = reference(r1, r2, t)
    ref.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z1.grad, r1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z2.grad, r2.grad, rtol=1e-10, atol=1e-12)


def test_nt_xent_closed_form_when_views_agree_and_images_are_orthogonal():
    n, t = 4, 0.2
    z = torch.eye(n, dtype=torch.float64) * 3.0  # norms are removed by the loss
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * n - 2)))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-12)


def test_dcl_is_nt_xent_without_the_positive_in_the_denominator():
    n, t = 4, 0.2
    z = torch.eye(n, dtype=torch.float64) * 3.0  # views agree, images orthogonal: every row scores alike
    nt, decoupled = nt_xent(z, z.clone(), t), dcl(z, z.clone(), t)
    assert decoupled.item() == pytest.approx(-1 / t + math.log(2 * n - 2), rel=1e-12)
    # per row: −s_p + log(e^{s_p} + N) = (−s_p + log N) + log(1 + e^{s_p}/N), and e^{s_p}/N = e^{−DCL}
    assert nt.item() == pytest.approx(decoupled.item() + math.log1p(math.exp(-decoupled.item())), rel=1e-12)
    # equal positive similarities: DCLW's weights are all 1
    assert dcl(z, z.clone(), t, sigma=0.5).item() == pytest.approx(decoupled.item(), rel=1e-12)
    # collapse (every embedding the same point) sits at ln(2N − 2), NT-Xent's at ln(2N − 1): what the warning quotes
    same = torch.ones(n, 3, dtype=torch.float64)
    for kind, loss in (("dcl", dcl(same, same.clone(), t)), ("nt_xent", nt_xent(same, same.clone(), t))):
        assert loss.item() == pytest.approx(collapsed_loss(kind, n), rel=1e-12)
        assert f"= {collapsed_loss(kind, n):.4f}" in collapse_warning(0.01, loss.item(), n, kind)


def test_dcl_kinds_through_the_config():
    a, b = _pair()
    torch.testing.assert_close(make_loss(LossConfig(kind="dcl", temperature=0.2, cos_weight=0.0))(a, b), dcl(a, b, 0.2))
    torch.testing.assert_close(make_loss(LossConfig(kind="dclw", temperature=0.2, cos_weight=0.0))(a, b),
                               reference_dcl(a, b, 0.2, DCLW_SIGMA), rtol=1e-12, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    torch.testing.assert_close(make_loss(LossConfig(kind="dcl", temperature=0.2, cos_weight=0.7))(a, b),
                               dcl(a, b, 0.2) + 0.7 * (1 - cos).mean())
    assert LossConfig().kind == "nt_xent"
    with pytest.raises(ValueError, match="kind"):
        LossConfig(kind="infonce")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcl(a.float(), b.float(), 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dcl(a, b, 0.2), rtol=1e-6, atol=1e-6)  # autocast did not drop to bf16


def test_nt_xent_is_symmetric_in_the_views_and_scale_invariant():
    a, b = _pair()
    torch.testing.assert_close(nt_xent(a, b, 0.3), nt_xent(b, a, 0.3))
    torch.testing.assert_close(nt_xent(5 * a, 0.1 * b, 0.3), nt_xent(a, b, 0.3))


def test_hybrid_adds_cosine_term():
    a, b = _pair()
    torch.testing.assert_close(hybrid_loss(a, b, 0.2, 0.7), reference_hybrid(a, b, 0.2, 0.7), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hybrid_loss(a, a.clone(), 0.2, 0.7), nt_xent(a, a.clone(), 0.2))
    torch.testing.assert_close(make_loss(LossConfig(temperature=0.2, cos_weight=0.0))(a, b), nt_xent(a, b, 0.2))


def test_low_precision_and_autocast_compute_in_fp32():
    a, b = _pair()
    ref = nt_xent(a, b, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hybrid_loss(a.bfloat16(), b.bfloat16(), 0.1, 0.5)
        plain = nt_xent(a.float(), b.float(), 0.1)
    assert out.dtype == torch.float32 and plain.dtype == torch.float32
    torch.testing.assert_close(plain.double(), ref, rtol=1e-6, atol=1e-6)  # autocast did not drop to bf16


def test_embedding_spread_separates_spread_from_collapsed_embeddings():
    torch.manual_seed(0)
    spread = torch.randn(4096, 32)
    assert float(embedding_spread(spread)) == pytest.approx(1.0, abs=0.02)  # isotropic: std 1/√d per dim
    assert float(embedding_spread(spread * 7.0)) == pytest.approx(float(embedding_spread(spread)), rel=1e-5)
    # every row the same direction (different lengths): collapsed, whatever the norm
    collapsed = torch.randn(1, 32) * torch.rand(256, 1).add(0.5)
    assert float(embedding_spread(collapsed)) < 1e-5
    # a shared offset much larger than the differences (how a network starts) reads as nearly collapsed
    start = torch.randn(1, 32) * 10 + torch.randn(256, 32) * 0.3
    assert 0.0 < float(embedding_spread(start)) < 0.1
    z = torch.randn(8, 32, requires_grad=True)
    assert not embedding_spread(z).requires_grad


def test_bad_inputs_raise():
    a, b = _pair()
    with pytest.raises(ValueError, match="equal shapes"):
        nt_xent(a, b[:3], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(a, b, 0.0)
    with pytest.raises(ValueError, match="cos_weight"):
        LossConfig(cos_weight=-1.0)


def _rank_losses(info: DistInfo, a: torch.Tensor, b: torch.Tensor) -> dict:
    """Each rank takes its slice of the global batch; returns loss values and input gradients."""
    per = a.shape[0] // info.world_size
    rows = slice(info.rank * per, (info.rank + 1) * per)
    out = {}
    for name, fn in {"nt": lambda x, y: nt_xent(x, y, 0.2), "hybrid": lambda x, y: hybrid_loss(x, y, 0.2, 0.7),
                     "local": lambda x, y: nt_xent(x, y, 0.2, gather=False),
                     "dcl": lambda x, y: dcl(x, y, 0.2), "dclw": lambda x, y: dcl(x, y, 0.2, sigma=DCLW_SIGMA),
                     "dcl_local": lambda x, y: dcl(x, y, 0.2, gather=False, sigma=DCLW_SIGMA)}.items():
        z1, z2 = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        loss = fn(z1, z2)
        loss.backward()
        out[name] = {"loss": loss.detach(), "mean": all_reduce_mean(loss), "g1": z1.grad, "g2": z2.grad}
    return out


@pytest.mark.timeout(180)
def test_two_ranks_equal_one_process_on_the_concatenated_batch():
    a, b = _pair(n=8, d=6, seed=3)
    res = run_local_processes(_rank_losses, 2, a, b)
    refs = {"nt": lambda x, y: reference_nt_xent(x, y, 0.2), "hybrid": lambda x, y: reference_hybrid(x, y, 0.2, 0.7),
            "dcl": lambda x, y: reference_dcl(x, y, 0.2), "dclw": lambda x, y: reference_dcl(x, y, 0.2, DCLW_SIGMA)}
    for name, ref_fn in refs.items():
        r1, r2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        ref = ref_fn(r1, r2)
        ref.backward()
        for rank in range(2):
            got = res[rank][name]
            # the mean over ranks of the per-rank losses is the global loss ...
            torch.testing.assert_close(got["mean"], ref.detach(), rtol=1e-12, atol=1e-12)
            # ... and each rank's input gradient is world_size × the global one (DDP then averages by 1/world)
            rows = slice(rank * 4, rank * 4 + 4)
            torch.testing.assert_close(got["g1"] / 2, r1.grad[rows], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["g2"] / 2, r2.grad[rows], rtol=1e-10, atol=1e-12)
        assert not torch.equal(res[0][name]["loss"], res[1][name]["loss"])  # ranks really score different rows
    # gather=False: each rank only contrasts against its own half
    for rank in range(2):
        rows = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(res[rank]["local"]["loss"], reference_nt_xent(a[rows], b[rows], 0.2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res[rank]["dcl_local"]["loss"], reference_dcl(a[rows], b[rows], 0.2, DCLW_SIGMA),
                                   rtol=1e-12, atol=1e-12)
