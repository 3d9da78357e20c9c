"""Images → WebDataset shards: safe archive walking, validation, atomic shards with DALI indexes.

See ``shards/README.md`` for the on-disk format; the contract with the loader is in docs/ARCHITECTURE.md.
"""

from dist_cardio.shard.build import ShardConfig, shard_inputs
from dist_cardio.shard.imagecheck import check_image_bytes
from dist_cardio.shard.manifest import read_manifest, read_samples
from dist_cardio.shard.verify import VerifyReport, verify_shard_set

__all__ = [
    "ShardConfig",
    "shard_inputs",
    "check_image_bytes",
    "read_manifest",
    "read_samples",
    "VerifyReport",
    "verify_shard_set",
]
