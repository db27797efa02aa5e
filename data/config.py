"""The data section of the run config: which shard directories to read, and how.

Composed into the run config (``train.config.RunConfig.data``) as an omegaconf structured config,
e.g. ``data.sources=[{path: runs/demo/data}, {path: s3://bucket/code, weight: 0.3}]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SourceConfig:
    path: str  # a shard directory written by data.prepare (local path or fsspec URL)
    weight: float = 1.0  # relative share of the samples (normalized over all sources)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # None -> the tokenizer stored in the (first) shard directory; a directory given here must
    # have the same fingerprint as the shards' tokenizer.
    tokenizer: Optional[str] = None
    # Share of each source's documents held out for split="validation" (chosen by a hash of the
    # document index, independent of the seed; at least one document when > 0).
    validation_fraction: float = 0.01
    # Mixture: each block of this many consecutive global samples holds every source in
    # proportion to its weight (largest-remainder rounding), in a seeded order.
    mixture_block_size: int = 1024
    # sha256 of each shard checked the first time this process reads it.
    verify_checksums: bool = True
    # Local cache for shard directories given as remote fsspec URLs (None: ~/.cache/difftron/shards).
    cache_dir: Optional[str] = None
    # Copy remote shards into the cache in a background thread from the start.
    prefetch: bool = True
