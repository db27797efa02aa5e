"""Remote shard directories through one node cache: each file is downloaded once for all ranks,
the next shards are fetched ahead of use, the cache is bounded, a full cache disk is one line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.loader import build_loader
from tests.data.remote_worker import PROTOCOL, register
from tests.data.synthetic import random_lengths, write_shard_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def remote(tmp_path, monkeypatch) -> Path:
    """A shard directory of 12 shards served as countingfs:// (downloads logged)."""
    register()
    monkeypatch.setenv("COUNTING_FS_LOG", str(tmp_path / "downloads.log"))
    return write_shard_dir(tmp_path / "remote", random_lengths(12, 30, seed=7), seed=7)


def downloads(tmp_path) -> list[tuple[str, str, str]]:
    log = tmp_path / "downloads.log"
    return [tuple(line.split(" ", 2)) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
def test_four_ranks_one_cache_fetch_each_file_once(tmp_path, remote):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COUNTING_FS_DELAY="0.1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.data.remote_worker", str(remote), str(tmp_path / "cache"), str(r), "4", "30"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(4)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    got = downloads(tmp_path)
    per_file = Counter(Path(path).name for _, _, path in got)
    manifest = json.loads((remote / "manifest.json").read_text())
    bins = {f"{s['name']}.bin" for s in manifest["shards"]}
    assert set(per_file) >= bins  # 30 steps x 32 samples touch every shard
    assert all(n == 1 for n in per_file.values()), per_file.most_common(3)  # once per node, for four ranks
    assert len({pid for pid, _, _ in got}) > 1  # and the ranks did share the work


def test_prefetch_ahead_and_bounded_cache(tmp_path, remote):
    url = f"{PROTOCOL}://{remote}"
    shard_bytes = max(p.stat().st_size for p in remote.glob("*.bin"))
    bound = 8.5 * shard_bytes
    cfg = DataConfig(sources=[SourceConfig(path=url)], cache_dir=str(tmp_path / "cache"), prefetch=True,
                     prefetch_shards=8, cache_max_gb=bound / 1e9)
    ld = build_loader(cfg, seq_len=16, global_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    local = build_loader(DataConfig(sources=[SourceConfig(path=str(remote))], verify_checksums=False),
                         seq_len=16, global_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    cache = ld.shard_sets[0].cache
    for step in range(60):
        before = len(downloads(tmp_path))
        assert torch.equal(ld.batch(step)["input_ids"], local.batch(step)["input_ids"])
        on_training_thread = [d for d in downloads(tmp_path)[before:] if d[1] == "MainThread" and d[2].endswith(".bin")]
        if step > 0:
            assert on_training_thread == [], step  # this step's shards were downloaded ahead, in the background
        cache.wait()
        cached = sum(p.stat().st_size for p in Path(cache.local).glob("shard_*.bin"))
        assert cached <= bound + shard_bytes  # the bound (+ the file just fetched)
    bins = [d for d in downloads(tmp_path) if d[2].endswith(".bin")]
    assert len(bins) > 12  # evicted shards came back when needed again


def test_full_cache_disk_is_one_line_naming_the_file(tmp_path, remote, monkeypatch):
    from tests.data.remote_worker import CountingFS

    def full(self, rpath, lpath, **kw):
        if str(lpath).split("/")[-1].startswith("shard_") and ".bin" in str(lpath):
            raise OSError(errno.ENOSPC, "No space left on device", lpath)
        return CountingFS.__mro__[1].get_file(self, rpath, lpath, **kw)

    monkeypatch.setattr(CountingFS, "get_file", full)
    ld = build_loader(DataConfig(sources=[SourceConfig(path=f"{PROTOCOL}://{remote}")], cache_dir=str(tmp_path / "cache"), prefetch=False),
                      seq_len=16, global_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    with pytest.raises(OSError) as e:
        ld.batch(0)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg
    assert msg.startswith(str(tmp_path / "cache")) and ".bin: cannot write to the shard cache" in msg
    assert not list(Path(ld.shard_sets[0].cache.local).glob("shard_*.bin*"))  # no partial file left
