"""model.py: shapes, config errors, classifier/unfreeze contracts, norm independence, FLOP count."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from dist_cardio import model as M
from dist_cardio.config import ConfigError, from_dict
from dist_cardio.model import Classifier, ModelConfig, SimCardioNet, count_flops, count_parameters, preset, sincos_2d, unfreeze_groups

SMALL = preset("tiny", dropout=0.0)


def _images(cfg: ModelConfig, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_shapes(pos, norm):
    cfg = preset("tiny", pos_encoding=pos, norm=norm)
    net = SimCardioNet(cfg)
    x = _images(cfg)
    assert net(x).shape == (3, cfg.proj_dim)
    assert net.features(x).shape == (3, net.feature_dim) and net.feature_dim == cfg.widths[-1]
    assert net.backbone.feature_map(x).shape == (3, cfg.widths[-1], cfg.grid, cfg.grid)


def test_learned_positions_resample_to_another_input_size():
    cfg = preset("tiny", pos_encoding="learned")
    net = SimCardioNet(cfg).eval()
    assert net(torch.randn(2, 3, 96, 96)).shape == (2, cfg.proj_dim)


def test_sincos_2d_rows_and_columns_are_separate_halves():
    pe = sincos_2d(3, 4, 16, torch.device("cpu"), torch.float32).reshape(3, 4, 16)
    assert torch.equal(pe[:, 0, :8], pe[:, 3, :8])  # row half does not depend on the column
    assert torch.equal(pe[0, :, 8:], pe[2, :, 8:])  # column half does not depend on the row
    assert len({tuple(v.tolist()) for v in pe.reshape(12, 16)}) == 12  # every position distinct


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(heads=3)
    with pytest.raises(ValueError, match="blocks"):
        ModelConfig(blocks=(1, 2))
    with pytest.raises(ValueError, match="input_size"):
        ModelConfig(input_size=100)
    with pytest.raises(ValueError, match="norm_groups"):
        ModelConfig(norm_groups=7)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    # through the project's YAML loader: tuples, literals and validation
    cfg = from_dict(ModelConfig, {"widths": [16, 32], "blocks": [1, 1], "input_size": 32, "norm_groups": 4})
    assert cfg.widths == (16, 32) and cfg.grid == 4
    with pytest.raises(ConfigError, match="pos_encoding"):
        from_dict(ModelConfig, {"pos_encoding": "rope"})


def test_group_norm_makes_embeddings_independent_of_batch_split():
    """Why ``norm: group`` is the default: an image's embedding must not depend on its chunk."""
    x = _images(SMALL, n=4)
    gn = SimCardioNet(SMALL).train()
    torch.testing.assert_close(gn(x)[:2], gn(x[:2]), rtol=1e-5, atol=1e-6)
    bn = SimCardioNet(preset("tiny", dropout=0.0, norm="batch")).train()
    assert not torch.allclose(bn(x)[:2], bn(x[:2]), atol=1e-3)


def test_classifier_shares_backbone_drops_projector_and_every_param_learns():
    enc = SimCardioNet(SMALL)
    clf = Classifier(enc, num_classes=5, dropout=0.2)
    assert clf.backbone is enc.backbone
    enc_ids = {id(p) for p in enc.projector.parameters()}
    assert not enc_ids & {id(p) for p in clf.parameters()}
    clf(_images(SMALL)).sum().backward()
    assert all(p.grad is not None for p in clf.parameters())  # DDP would reject unused parameters
    assert clf(_images(SMALL)).shape == (3, 5)
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(enc, 0)


def test_unfreeze_groups_order_and_partition():
    clf = Classifier(SimCardioNet(SMALL), 3)
    groups = unfreeze_groups(clf)
    assert [g.name for g in groups] == ["head", "attention", "stage3", "stage2", "stage1", "stem"]
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in clf.parameters()}
    assert all(g.params for g in groups)


def test_cam_layer_outputs_the_spatial_map_before_attention():
    clf = Classifier(SimCardioNet(SMALL), 3)
    seen = []
    handle = clf.cam_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    clf(_images(SMALL, n=2))
    handle.remove()
    assert seen[0].shape == (2, SMALL.widths[-1], SMALL.grid, SMALL.grid)


def test_channels_last_gives_the_same_result():
    net = SimCardioNet(SMALL).eval()
    x = _images(SMALL)
    ref = net(x)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)
    assert M.memory_format(torch.device("cpu")) == torch.contiguous_format
    assert M.memory_format(torch.device("cuda", 0)) == torch.channels_last


def test_bf16_autocast_forward_runs():
    net = SimCardioNet(SMALL).eval()
    x = _images(SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = net(x)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), net(x), rtol=0.1, atol=0.05)


def _expected_flops(cfg: ModelConfig) -> int:
    """Independent count: hooks on a real CPU forward, 2·MACs of convs/linears + attention matmuls."""
    net = SimCardioNet(cfg).eval()
    total = 0

    def conv(m: nn.Conv2d, _, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: nn.Linear, _, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features  # bias adds are not counted

    def attention(m: M.SelfAttention, inp, _):
        nonlocal total
        b, n, d = inp[0].shape
        total += 2 * 2 * b * n * n * d  # q·kᵀ and attn·v

    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(conv)
        elif isinstance(mod, nn.Linear):
            mod.register_forward_hook(linear)
        elif isinstance(mod, M.SelfAttention):
            mod.register_forward_hook(attention)
    with torch.no_grad():
        net(torch.zeros(1, 3, cfg.input_size, cfg.input_size))
    return total


def test_count_flops_matches_an_independent_count():
    assert count_flops(SMALL) == _expected_flops(SMALL)
    assert count_flops(SMALL, batch=3) == 3 * count_flops(SMALL)


@pytest.mark.parametrize("name", ["default", "cpu-small"])
def test_module_docstring_states_the_real_size_of_the_presets(name):
    cfg = M.PRESETS[name]
    net = SimCardioNet(cfg)
    params = count_parameters(net)
    h, w = cfg.input_shape
    row = re.search(rf"``{name}`` \| {w}×{h} \| ([\d.]+) M .*\| ([\d.]+) \|", M.__doc__)
    assert row, "size table missing from the model docstring"
    assert float(row.group(1)) == round(params / 1e6, 2)
    assert float(row.group(2)) == round(count_flops(cfg) / 1e9, 2)


@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_landscape_input_keeps_the_page_aspect(pos):
    """cpu-small reads 512 × 352 px pages (width × height): a 16 × 11 map of tokens, no square anywhere."""
    cfg = preset("cpu-small", pos_encoding=pos, dropout=0.0)
    assert cfg.input_shape == (352, 512) and cfg.grid_shape == (11, 16)
    net = SimCardioNet(cfg).eval()
    x = torch.randn(2, 3, *cfg.input_shape, generator=torch.Generator().manual_seed(0))
    assert net.backbone.feature_map(x).shape == (2, 128, 11, 16)
    assert net(x).shape == (2, cfg.proj_dim)
    with pytest.raises(ValueError, match="input_height"):
        preset("cpu-small", input_height=350)


def test_maxpool_downsampling_and_projection_batchnorm():
    cfg = preset("cpu-small")
    net = SimCardioNet(cfg)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.backbone.modules()) == 2 + len(cfg.widths) - 1
    assert not any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in net.backbone.stem)
    assert isinstance(net.projector[1], nn.BatchNorm1d)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in SimCardioNet(preset("tiny")).projector)
    # FLOPs follow the input shape, not a square of its width
    assert count_flops(cfg) < count_flops(preset("cpu-small", input_height=512))
