"""Torch-free page preparation against its references: the numpy grid filters against scipy.ndimage, the
input array against the torchvision evaluation transform (bit for bit, on real printouts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dist_cardio.data import AugmentConfig, build_torchvision_transform
from dist_cardio.downstream.page import PageConfig, find_grid, window_max, window_mean
from dist_cardio.downstream.page_input import InputSpec, decode_image, input_array, model_image


# run = max(5, round(detect_side · 25 / 1024)) and 2·run for detect sides 512 and 768, plus odd and even others
@pytest.mark.parametrize("size", [2, 5, 9, 12, 19, 24, 38])
def test_window_filters_equal_scipy(size):
    rng = np.random.default_rng(size)
    grey = (rng.random((131, 257)) * 255).astype(np.float32)
    ink = (rng.random((131, 257)) > 0.4).astype(np.float32)
    for axis in (0, 1):
        ours, ref = window_mean(grey, size, axis), ndimage.uniform_filter1d(grey, size, axis=axis)
        assert ours.dtype == ref.dtype and np.abs(ours - ref).max() < 1e-3  # float32 means of values up to 255
        assert np.array_equal(window_mean(ink, size, axis) > 0.7, ndimage.uniform_filter1d(ink, size, axis=axis) > 0.7)
    assert np.array_equal(window_max(grey, size), ndimage.maximum_filter(grey, size=size))
    box = window_mean(window_mean(ink, size, 0), size, 1)
    assert np.abs(box - ndimage.uniform_filter(ink, size)).max() < 1e-6
    profile = rng.random(300)
    assert np.abs(window_mean(profile, size, 0) - ndimage.uniform_filter1d(profile, size)).max() < 1e-12


def _printouts(shared_data: Path, n: int) -> list[Path]:
    return sorted(p for p in (shared_data / "ecg-printouts").iterdir() if p.suffix.lower() in (".png", ".jpg"))[:n]


def test_grid_found_on_real_printouts(shared_data):
    """The numpy filters still find the grid: a box inside the page, well below the header band."""
    for path in _printouts(shared_data, 6):
        page = decode_image(path.read_bytes(), 768)
        grid = find_grid(page, PageConfig(mode="crop"))
        left, top, right, bottom = grid.box
        assert grid.detected and 0 <= left < right <= 1 and 0 <= top < bottom <= 1 and (right - left) * (bottom - top) > 0.3


@pytest.mark.parametrize("size,height,cache", [(64, None, 96), (512, 352, 512), (96, 68, 160)])
def test_input_array_is_the_torchvision_evaluation_transform(shared_data, size, height, cache):
    aug = AugmentConfig(size=size, height=height)
    transform = build_torchvision_transform(aug, train=False)
    for path in _printouts(shared_data, 4):
        copy = model_image(decode_image(path.read_bytes(), 768), PageConfig(mode="crop"), cache, input_shape=aug.shape)
        ours = input_array(copy, aug.shape, aug.mean, aug.std)
        assert ours.dtype == np.float32 and ours.shape == (3, *aug.shape)
        assert np.array_equal(ours, transform(copy).numpy())


def test_input_spec_round_trip():
    spec = InputSpec(PageConfig(mode="mask", fallback_box=(0.1, 0.2, 0.9, 0.95), detect_side=512, min_density=0.2),
                     96, (68, 96), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert InputSpec.from_dict(spec.to_dict()) == spec
    broken = spec.to_dict() | {"page": spec.to_dict()["page"] | {"mode": "zoom"}}
    with pytest.raises(ValueError, match="zoom"):
        InputSpec.from_dict(broken)
