"""Shards → augmented batches: DALI when available (GPU or CPU-only), a torchvision fallback otherwise.

Importing this package does not import DALI: only ``dali_pipeline.py`` does, when a DALI loader is built.
"""

from dist_cardio.data.augment import AugmentConfig
from dist_cardio.data.loader import LoaderConfig, ShardLoader, contrastive_loader, labeled_loader
from dist_cardio.data.shardset import ShardDataError
from dist_cardio.data.torchvision_pipeline import build_torchvision_transform

__all__ = [
    "AugmentConfig",
    "LoaderConfig",
    "ShardLoader",
    "ShardDataError",
    "contrastive_loader",
    "labeled_loader",
    "build_torchvision_transform",
]
