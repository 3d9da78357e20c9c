"""The SimCLR augmentations for ECG printouts, as one config both loader backends implement.

A view is made in this order, by DALI (``dali_pipeline.py``) and by torchvision (``torchvision_pipeline.py``)
alike: random resized crop to ``shape`` (height × width) → small rotation → colour jitter (brightness, saturation, hue,
contrast, in that fixed order, all together with probability ``jitter_p``) → grayscale → blur → flips →
normalisation to float. Evaluation (``train=False``) resizes the whole page to ``shape`` and
normalises, so every lead stays in view.

ECG-specific choices: a horizontal flip reverses time and a vertical flip inverts the polarity of every
lead, so both are off by default; the rotation stays small (a scan is skewed, never upside down); the
rotation fill is white, the colour of ECG paper, so corners do not become a black shortcut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges (``augment:`` section of the pretraining and fine-tuning configs)."""

    size: int = 224
    """Width of the output views in pixels (the network input's ``model.input_size``)."""
    height: int | None = None
    """Height of the output views (``model.input_height``); None = square. A page squeezed into a square
    loses its aspect (A4 landscape is 1.41 wide for 1 high) and a fifth of its horizontal resolution."""
    crop_scale: tuple[float, float] = (0.25, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the page. The lower bound keeps
    a few beats of several leads in every view; SimCLR's ImageNet default 0.08 often cuts one lead only."""
    crop_ratio: tuple[float, float] = (0.75, 1.5)
    """Random resized crop: range of the crop's width / height before it is resized to a square. Up to 1.5
    so a near-whole landscape page (A4: 1.41) is a possible view, like the evaluation resize."""
    rotation: float = 5.0
    """Rotation angle drawn uniformly from [-rotation, +rotation] degrees (scan skew; at most 30)."""
    rotation_fill: int = 255
    """Grey level (0-255) of the corners a rotation uncovers: 255, white paper."""
    jitter_p: float = 0.8
    """Probability of applying the colour jitter below (all four factors together) to a view."""
    brightness: float = 0.4
    """Brightness factor drawn from [1 - brightness, 1 + brightness] (multiplies the pixels)."""
    contrast: float = 0.4
    """Contrast factor from [1 - contrast, 1 + contrast], around the view's mean grey level."""
    saturation: float = 0.4
    """Saturation factor from [1 - saturation, 1 + saturation] (0 would be grey): grid colours vary by printer."""
    hue: float = 0.05
    """Hue shift from [-hue, +hue] turns of the colour circle (0.5 at most), e.g. red ↔ pink grids."""
    grayscale_p: float = 0.2
    """Probability of turning a view grey (3 equal channels): many scans and faxes have no colour."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur (scanner optics). Off by default: thin traces are the signal."""
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    """Range of the blur's standard deviation in output pixels."""
    hflip_p: float = 0.0
    """Probability of a horizontal flip. It reverses time (the QRS before the P wave): off for ECGs."""
    vflip_p: float = 0.0
    """Probability of a vertical flip. It inverts the polarity of every lead: off for ECGs."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean subtracted after scaling pixels to [0, 1] (ImageNet's, like torchvision models)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation divided by after subtracting ``mean``."""

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise ValueError(f"size must be in 16..4096 pixels, got {self.size}")
        if self.height is not None and not 16 <= self.height <= 4096:
            raise ValueError(f"height must be in 16..4096 pixels (or null for square views), got {self.height}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0.0 <= self.rotation <= 30.0:
            raise ValueError(f"rotation must be in 0..30 degrees (ECG printouts are never upside down), got {self.rotation}")
        if not 0 <= self.rotation_fill <= 255:
            raise ValueError(f"rotation_fill must be a grey level in 0..255, got {self.rotation_fill}")
        for name in ("jitter_p", "grayscale_p", "blur_p", "hflip_p", "vflip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in 0..1, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (factors stay positive), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in 0..0.5 turns, got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi <= 10.0:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high <= 10, got {self.blur_sigma}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean {self.mean}, std {self.std}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of every view."""
        return (self.height or self.size, self.size)

    @property
    def jitters(self) -> bool:
        """Whether colour jitter can change a view at all."""
        return self.jitter_p > 0 and (self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0)

    @property
    def blur_kernel(self) -> int:
        """Odd blur window covering ±3 of the largest sigma (both backends use the same window)."""
        return 2 * math.ceil(3.0 * self.blur_sigma[1]) + 1

    def min_source_area(self) -> int:
        """Fewest source pixels a page may have so that the smallest allowed crop still has ≥ ``size`` px
        on both sides, i.e. is still shrunk, never enlarged, to the output.

        A decoder that can reduce resolution cheaply (JPEG DCT scaling) may stop there without losing
        detail in any view: the crop is relative, so cutting it from the reduced page gives the same view.
        """
        narrowest = min(self.crop_ratio[0], 1.0 / self.crop_ratio[1])
        h, w = self.shape
        return math.ceil(max(h, w) ** 2 / (self.crop_scale[0] * narrowest))
