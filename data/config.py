"""The data section of the run config: which shard directories to read, and how.

Composed into the run config (``train.config.RunConfig.data``) as an omegaconf structured config,
e.g. ``data.sources=[{path: runs/demo/data}, {path: s3://bucket/code, weight: 0.3}]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SourceConfig:
    path: str  # a shard directory written by data.prepare (local path or fsspec URL), or a Megatron PREFIX
    weight: float = 1.0  # relative share of the samples (normalized over all sources)
    # "shards" (a data.prepare directory), "megatron" (PREFIX.bin + PREFIX.idx, local; needs
    # data.tokenizer) or "auto" (megatron when PREFIX.idx and PREFIX.bin exist, else shards).
    format: str = "auto"


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
    # sha256 of each shard verified once per cache directory (one background thread on one process
    # per node; recorded so later runs skip it); remote shards are verified as they are downloaded.
    verify_checksums: bool = True
    # Local cache: the mirror of remote shard directories (CACHE/<url digest>/) and the sample
    # index (CACHE/index/). None: remote mirrors in ~/.cache/difftron/shards, the index next to
    # the data (.difftron_index/, or ~/.cache/difftron/index when that is read-only).
    cache_dir: Optional[str] = None
    # Download the shards the next steps of this rank need in a background thread.
    prefetch: bool = True
    # How many shards (per source) to download ahead of use when prefetch is on.
    prefetch_shards: int = 4
    # Bound on the remote mirror's .bin files per source, in GB (least recently used evicted); None: unbounded.
    cache_max_gb: Optional[float] = None
    # Open shard files (memory maps, one descriptor each) per source; least recently used closed.
    max_open_shards: int = 64
