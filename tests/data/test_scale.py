"""2T-token scale on CPU: 30,000 shards and 50 M documents (sparse ``.bin``, real ``.idx``).

The sample index is built once (one process, as the first rank of a node), then every ``.idx``
is deleted, so the ranks can only start from the cached, memory-mapped index. Four ranks start a
train and a validation loader each and take 1,000 steps: each rank's RSS for the loaders stays
under 200 MB (the old loader held 24-48 bytes per document: > 1.2 GB here) and the shard files
it holds open stay under the LRU bound (the old loader kept every touched shard open).
Start-up times are printed (not asserted: the CI machine is shared); BENCHMARKS.md has them.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tools.benchmarks.data import even_lengths, run_probe, write_shard_dir

SHARDS, DOCS_PER_SHARD = 30_000, 1_667  # 50.01 M documents
MAX_OPEN, STEPS, RANKS = 32, 1_000, 4


@pytest.mark.slow
def test_30k_shards_50m_documents(tmp_path):
    t0 = time.perf_counter()
    root = write_shard_dir(tmp_path / "big", even_lengths(SHARDS, DOCS_PER_SHARD), sparse=True, vocab_size=50_000)
    m = json.loads((root / "manifest.json").read_text())
    assert len(m["shards"]) == SHARDS and m["total_documents"] == SHARDS * DOCS_PER_SHARD >= 50_000_000
    made = time.perf_counter() - t0

    built = run_probe([root, -1, RANKS, MAX_OPEN, 0])
    for p in root.glob("*.idx"):
        p.unlink()  # from here on, start-up can only come from the cached index

    with ThreadPoolExecutor(RANKS) as pool:  # the ranks run at the same time, each in its own process
        ranks = list(pool.map(lambda r: run_probe([root, r, RANKS, MAX_OPEN, STEPS]), range(RANKS)))
    print(f"\nwrote {SHARDS} shards in {made:.1f}s; index build {built['build_s']:.1f}s "
          f"({built['build_cpu_s']:.1f} CPU-s, peak RSS growth {built['build_peak_rss_mb']:.0f} MB)")
    for r in ranks:
        print(f"rank {r['rank']}: start-up {r['startup_s']:.2f}s ({r['startup_cpu_s']:.2f} CPU-s), loader RSS "
              f"{r['rss_loader_mb']:.0f} MB, after {STEPS} steps {r['rss_after_steps_mb']:.0f} MB, max new fds {r['max_new_fds']}")
    for r in ranks:
        assert r["num_samples"] == ranks[0]["num_samples"] and r["steps"] == STEPS
        assert r["rss_loader_mb"] < 200 and r["rss_after_steps_mb"] < 200, r
        # both loaders' shard maps (MAX_OPEN each) plus the index's memory maps and lock files
        assert r["open_shards"] <= 2 * MAX_OPEN and r["max_new_fds"] <= 2 * MAX_OPEN + 16, r
