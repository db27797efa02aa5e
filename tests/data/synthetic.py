"""Synthetic token-shard directories written directly with numpy (no tokenizer): for the golden
sample-sequence test and the 30,000-shard / 50 M-document scale test.

``write_shard_dir`` writes real ``.idx`` files and a real manifest; ``.bin`` files are either real
(seeded random tokens) or sparse (``sparse=True``: holes of zeros, no disk blocks; shards of one
size are hard links to one sparse file).
"""

from __future__ import annotations

import numpy as np

from tools.benchmarks.data import write_shard_dir  # noqa: F401  (the writer lives with the scale bench)


def random_lengths(num_shards: int, docs_per_shard: int, seed: int, lo: int = 3, hi: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=docs_per_shard) for _ in range(num_shards)]
