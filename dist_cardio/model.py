"""SimCardioNet: a residual CNN whose last feature map is read by multi-head self-attention.

Layout: stem (two 3×3 convs, /4: strided, or stride 1 + 2×2 max-pool with ``downsample: maxpool``) → stages of residual basic blocks (the first stage keeps the
resolution, every later stage halves it) → transformer blocks over the spatial positions of the last map
(tokens = positions, 2-D sinusoidal or learned position encoding, pre-norm attention + MLP) → final
LayerNorm → mean over tokens = the feature vector ``[B, D]`` (``D = widths[-1]``). Pretraining adds an
MLP projection head (``D → proj_hidden → proj_dim``); fine-tuning replaces it with a linear classifier.

Why GroupNorm by default: gradient caching (``gradcache.py``) runs the batch in chunks, and every rank
sees only its share of the global batch, so BatchNorm statistics would depend on chunk size and rank
count (and running statistics would update once per chunk pass). GroupNorm normalises each image on its
own: the embeddings, hence the contrastive objective, do not depend on how the batch is split.
``norm: batch`` is allowed (per-chunk "ghost" BN statistics) for comparison.

Size, computed with :func:`count_parameters` and :func:`count_flops` (FLOPs = 2 × multiply-adds of
convolutions, linear layers and attention matmuls; a training step costs ≈ 3× the forward):

| preset | input (w × h) | parameters (encoder + projection) | forward GFLOPs / image |
| --- | --- | --- | --- |
| ``default`` | 768×544 | 4.04 M (3.84 M + 0.20 M) | 7.96 |
| ``cpu-small`` | 512×352 | 0.48 M (0.435 M + 0.050 M) | 0.45 |
| ``tiny`` | 64×64 | 0.12 M (0.113 M + 0.006 M) | 0.0092 |

Geometry: pages are landscape (A4 297 × 210 mm) and the diagnosis is millimetre-sized (QRS 2-3 mm, ST 1 mm):
``default`` reads ≈2.6 px/mm, ``cpu-small`` ≈1.8 px/mm of the grid; ``tiny`` (0.2 px/mm) only tests machinery.

GPU speed-ups: put the model and inputs in :func:`memory_format` for the device (channels-last on CUDA,
which the convolutions prefer; the token flatten is then free) and run bf16 — DeepSpeed
``"bf16": {"enabled": true}`` or Accelerate ``mixed_precision="bf16"`` (both autocast/cast for you). The
attention uses ``F.scaled_dot_product_attention`` (flash kernels on GPU); the loss upcasts to fp32.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of SimCardioNet; see the presets in :data:`PRESETS`."""

    widths: tuple[int, ...] = (32, 64, 128, 256)
    """Channels of each residual stage; the last one is the attention width and the feature dim."""
    blocks: tuple[int, ...] = (1, 2, 2, 2)
    """Residual basic blocks per stage (same length as ``widths``)."""
    attn_layers: int = 2
    """Transformer blocks over the last feature map (0 = plain mean pooling of the CNN map)."""
    heads: int = 4
    """Attention heads; must divide ``widths[-1]``."""
    mlp_ratio: float = 2.0
    """Hidden width of each transformer MLP, as a multiple of the attention width."""
    pos_encoding: Literal["sinusoidal", "learned"] = "sinusoidal"
    """2-D sinusoidal (fixed, any grid size) or learned (one vector per position of the input grid)."""
    input_size: int = 224
    """Width of the input images in pixels; must be divisible by the total stride."""
    input_height: int | None = None
    """Height of the input images (divisible by the total stride); None = square (``input_size``). ECG
    pages are landscape (A4: 1.41, the grid box of a rendered page 1.47): set it so the page keeps its aspect."""
    proj_hidden: int = 512
    """Hidden width of the projection head."""
    proj_dim: int = 128
    """Output dim of the projection head (the contrastive embedding)."""
    proj_norm: bool = False
    """BatchNorm after the projection head's hidden layer (SimCLR v2, lightly's default): at small batches
    it keeps the embeddings from collapsing onto one point. Statistics are per forward pass (per chunk
    when gradient caching), and only pretraining uses the head."""
    norm: Literal["group", "batch"] = "group"
    """Normalisation of the convolutional blocks (see the module docstring for why ``group``)."""
    norm_groups: int = 8
    """Groups of GroupNorm; must divide every width."""
    dropout: float = 0.1
    """Dropout on the attention weights and the residual branches of the transformer blocks."""
    in_channels: int = 3
    """Image channels (the loaders deliver RGB)."""
    downsample: Literal["stride", "maxpool"] = "stride"
    """How stem and stages halve the resolution: strided 3×3 convs, or stride-1 convs + 2×2 max-pool, which
    keeps a 1-2 px trace's response wherever it falls (on PTB-XL renders it fits where strided does not)."""

    def __post_init__(self) -> None:
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"widths must be positive channel counts, got {self.widths}")
        if len(self.blocks) != len(self.widths) or any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks needs one count ≥ 1 per stage ({len(self.widths)}), got {self.blocks}")
        if self.attn_layers < 0:
            raise ValueError(f"attn_layers must be ≥ 0, got {self.attn_layers}")
        dim = self.widths[-1]
        if self.heads < 1 or dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide the last width ({dim})")
        if self.pos_encoding == "sinusoidal" and dim % 4:
            raise ValueError(f"2-D sinusoidal position encoding needs the last width divisible by 4, got {dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.input_size <= 0 or self.input_size % self.stride:
            raise ValueError(f"input_size ({self.input_size}) must be a positive multiple of the total stride {self.stride}")
        if self.input_height is not None and (self.input_height <= 0 or self.input_height % self.stride):
            raise ValueError(f"input_height ({self.input_height}) must be a positive multiple of the total stride {self.stride}")
        if self.proj_hidden < 1 or self.proj_dim < 1:
            raise ValueError(f"proj_hidden and proj_dim must be ≥ 1, got {self.proj_hidden}, {self.proj_dim}")
        if self.norm == "group" and (self.norm_groups < 1 or any(w % self.norm_groups for w in self.widths)):
            raise ValueError(f"norm_groups ({self.norm_groups}) must divide every width {self.widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be ≥ 1, got {self.in_channels}")

    @property
    def stride(self) -> int:
        """Total downsampling from input to the last feature map (stem /4, then /2 per later stage)."""
        return 4 * 2 ** (len(self.widths) - 1)

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the input images."""
        return (self.input_height or self.input_size, self.input_size)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the last feature map (the attention sees ``rows × cols`` tokens)."""
        h, w = self.input_shape
        return h // self.stride, w // self.stride

    @property
    def grid(self) -> int:
        """Columns of the last feature map (its side when the input is square)."""
        return self.grid_shape[1]


PRESETS: dict[str, ModelConfig] = {
    "default": ModelConfig(input_size=768, input_height=544),
    "cpu-small": ModelConfig(
        widths=(8, 32, 64, 128), blocks=(1, 1, 1, 1), attn_layers=1, heads=4, input_size=512, input_height=352,
        proj_hidden=256, proj_dim=64, norm="batch", downsample="maxpool", proj_norm=True,
    ),
    "tiny": ModelConfig(
        widths=(16, 32, 64), blocks=(1, 1, 1), attn_layers=1, heads=2, input_size=64,
        proj_hidden=64, proj_dim=32, norm_groups=4,
    ),
}
"""Named configs: ``default`` (GPUs, 768×544 px pages ≈ 2.6 px/mm), ``cpu-small`` (CPUs, 512×352 px ≈ 1.8 px/mm
of the grid: what a 2-core machine can train and still read a trace) and ``tiny`` (64 px: a smoke size for
tests of the machinery; at ≈0.2 px/mm it cannot read an ECG)."""


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset with some fields replaced, e.g. ``preset("tiny", dropout=0.0)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (choose one of {', '.join(PRESETS)})")
    return replace(PRESETS[name], **overrides)


def _norm2d(cfg: ModelConfig, channels: int) -> nn.Module:
    if cfg.norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(cfg.norm_groups, channels)


class ResidualBlock(nn.Module):
    """Basic block: two 3×3 convs with a shortcut (1×1 projection when shape changes)."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm2d(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm2d(cfg, cout)
        # Zero-initialised last scale: each block starts as the identity, which keeps deep stacks stable.
        nn.init.zeros_(self.norm2.weight)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 1, stride, bias=False), norm=_norm2d(cfg, cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D position encoding ``[h·w, dim]``: half the channels encode the row, half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    y = ys.reshape(-1, 1) * omega
    x = xs.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class SpatialAttention(nn.Module):
    """Self-attention over the positions of a feature map ``[B, C, h, w]`` → pooled ``[B, C]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.widths[-1]
        self.pos_encoding = cfg.pos_encoding
        if cfg.pos_encoding == "learned":
            self.grid_shape = cfg.grid_shape
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_shape[0] * self.grid_shape[1], dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.attn_layers))
        self.norm = nn.LayerNorm(dim)

    def _positions(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        if self.pos_encoding == "sinusoidal":
            return sincos_2d(h, w, x.shape[-1], x.device, x.dtype)
        pos = self.pos_embed
        rows, cols = self.grid_shape
        if (h, w) != (rows, cols):  # another input size than trained: resample the learned grid
            grid = pos.reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        return pos[0].to(x.dtype)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        _, _, h, w = fmap.shape
        x = fmap.flatten(2).transpose(1, 2)  # [B, h·w, C]; a free view when fmap is channels-last
        x = x + self._positions(h, w, x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)


class Backbone(nn.Module):
    """Stem → residual stages → spatial attention → pooled features ``[B, widths[-1]]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w0 = cfg.widths[0]
        # Named so that parameter-name rules (e.g. LARS's "*norm*" exclusion) see what each tensor is.
        pool = cfg.downsample == "maxpool"
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        for k, cin in enumerate((cfg.in_channels, w0), start=1):
            stem[f"conv{k}"] = nn.Conv2d(cin, w0, 3, 1 if pool else 2, 1, bias=False)
            stem[f"norm{k}"] = _norm2d(cfg, w0)
            stem[f"act{k}"] = nn.ReLU(inplace=True)
            if pool:
                stem[f"pool{k}"] = nn.MaxPool2d(2)
        self.stem = nn.Sequential(stem)
        stages = []
        cin = w0
        for i, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
            stride = 1 if i == 0 or pool else 2
            blocks: list[nn.Module] = [nn.MaxPool2d(2)] if pool and i > 0 else []
            blocks += [ResidualBlock(cfg, cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.attention = SpatialAttention(cfg)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional map ``[B, C, h, w]`` (what Grad-CAM looks at)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.feature_map(x))


class SimCardioNet(nn.Module):
    """Encoder + projection head for contrastive pretraining.

    ``forward`` returns the projection ``z [B, proj_dim]`` NOT L2-normalised (the loss normalises, in
    fp32); ``features`` returns the pooled encoder output ``[B, feature_dim]`` used downstream.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        hidden: list[nn.Module] = [nn.Linear(cfg.widths[-1], cfg.proj_hidden)]
        if cfg.proj_norm:
            hidden.append(nn.BatchNorm1d(cfg.proj_hidden))
        self.projector = nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(cfg.proj_hidden, cfg.proj_dim))

    @property
    def feature_dim(self) -> int:
        return self.cfg.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Classifier(nn.Module):
    """Fine-tuning model: the encoder's backbone (shared modules, pretrained weights) + dropout + linear.

    The projection head is not kept, so every parameter of the classifier receives a gradient (DDP
    requires that). ``forward`` returns logits ``[B, num_classes]``.
    """

    def __init__(self, encoder: SimCardioNet, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.cfg = encoder.cfg
        self.backbone = encoder.backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.feature_dim, num_classes))

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is the last spatial map before attention (Grad-CAM's target layer)."""
        return self.backbone.stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class ParamGroup(NamedTuple):
    """A named slice of the model for gradual unfreezing."""

    name: str
    params: list[nn.Parameter]


def unfreeze_groups(classifier: Classifier) -> list[ParamGroup]:
    """Parameter groups from the output down: head, attention, last stage, ..., first stage, stem.

    Gradual unfreezing thaws them in this order; every parameter appears in exactly one group.
    """
    bb = classifier.backbone
    groups = [ParamGroup("head", list(classifier.head.parameters())), ParamGroup("attention", list(bb.attention.parameters()))]
    for i in reversed(range(len(bb.stages))):
        groups.append(ParamGroup(f"stage{i + 1}", list(bb.stages[i].parameters())))
    groups.append(ParamGroup("stem", list(bb.stem.parameters())))
    return groups


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA (faster convolutions), contiguous elsewhere; use for model and inputs."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(cfg: ModelConfig, batch: int = 1) -> int:
    """Forward FLOPs of ``SimCardioNet(cfg)`` for ``batch`` images of ``input_shape`` (shapes only, meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SimCardioNet(cfg).eval()  # eval: BatchNorm takes a batch of 1
        x = torch.empty(batch, cfg.in_channels, *cfg.input_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


__all__ = [
    "ModelConfig", "PRESETS", "preset", "SimCardioNet", "Classifier", "ParamGroup", "unfreeze_groups",
    "memory_format", "count_parameters", "count_flops", "sincos_2d",
]
