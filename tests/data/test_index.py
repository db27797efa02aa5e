"""The cached sample index: built once per data configuration (one builder under a file lock),
shared by both splits and every rank, memory-mapped, keyed by what it depends on; a cache built
for other data is rebuilt, never used; a full disk gives one line naming the file."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data.index as index_mod
from data.config import DataConfig, SourceConfig
from data.loader import build_loader
from tests.data.synthetic import random_lengths, write_shard_dir


def make(path, cache=None, split="train", rank=0, dp=1, **kw):
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], cache_dir=None if cache is None else str(cache), **kw)
    return build_loader(cfg, seq_len=16, global_batch_size=8, dp_rank=rank, dp_size=dp, seed=4, split=split)


def batches(ld, steps=6):
    return torch.cat([ld.batch(s)["input_ids"] for s in range(steps)])


def index_dirs(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / "meta.json").exists())


def test_built_once_shared_by_splits_and_ranks(tmp_path, monkeypatch):
    data = write_shard_dir(tmp_path / "a", random_lengths(4, 50, seed=1), seed=1)
    first = make(data, tmp_path / "cache")
    (built,) = index_dirs(tmp_path / "cache" / "index")
    calls = []
    monkeypatch.setattr(index_mod, "build_index", lambda *a, **k: calls.append(1))
    others = [make(data, tmp_path / "cache", split=s, rank=r, dp=2) for s in ("train", "validation") for r in (0, 1)]
    assert calls == [] and index_dirs(tmp_path / "cache" / "index") == [built]
    for ld in [first, *others]:
        for src in ld.sources:
            assert all(isinstance(a, np.memmap) for a in (src.seg_start, src.seg_cum))  # read-only maps, not copies
    assert not (data / ".difftron_index").exists()  # data.cache_dir given: nothing written next to the data
    # without data.cache_dir the index lives next to the shards
    monkeypatch.undo()
    make(data)
    assert len(index_dirs(data / ".difftron_index")) == 1


def _start_loader(data: str, cache: str, log: str) -> None:
    original = index_mod.build_index

    def counted(*a, **k):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(*a, **k)

    index_mod.build_index = counted
    make(data, cache).batch(0)


def test_concurrent_ranks_build_once(tmp_path):
    data = write_shard_dir(tmp_path / "a", random_lengths(6, 200, seed=2), seed=2)
    log = tmp_path / "builds.log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_start_loader, args=(str(data), str(tmp_path / "cache"), str(log))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1  # one builder; the other three waited on the lock and mapped its files


def test_cache_of_other_data_is_rebuilt_not_used(tmp_path):
    a = write_shard_dir(tmp_path / "a", random_lengths(3, 60, seed=3), seed=3)
    b = write_shard_dir(tmp_path / "b", random_lengths(3, 60, seed=4), seed=4)
    expected_b = batches(make(b, tmp_path / "fresh"))
    make(a, tmp_path / "cache")
    (a_index,) = index_dirs(tmp_path / "cache" / "index")
    make(b, tmp_path / "probe")
    (b_index,) = index_dirs(tmp_path / "probe" / "index")
    # plant a's index under b's key (a stale or foreign cache): b's loader must not use it
    shutil.copytree(a_index, tmp_path / "cache" / "index" / b_index.name)
    assert torch.equal(batches(make(b, tmp_path / "cache")), expected_b)
    meta = json.loads((tmp_path / "cache" / "index" / b_index.name / "meta.json").read_text())
    assert meta["fields"] == json.loads((b_index / "meta.json").read_text())["fields"]  # rebuilt for b
    # the data at a path replaced by other data: a new key, the old index is never read
    shutil.rmtree(a)
    shutil.copytree(b, a, ignore=shutil.ignore_patterns(".difftron_index"))
    assert torch.equal(batches(make(a, tmp_path / "cache")), expected_b)
    # a damaged index (truncated array) is rebuilt too
    for npy in Path(b_index).glob("*.npy"):
        npy.write_bytes(npy.read_bytes()[:-8])
    assert torch.equal(batches(make(b, tmp_path / "probe")), expected_b)


def test_full_cache_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    data = write_shard_dir(tmp_path / "a", random_lengths(2, 40, seed=5), seed=5)

    def full(self, values):
        raise OSError(errno.ENOSPC, "No space left on device", self.path + ".raw")

    monkeypatch.setattr(index_mod._Appender, "add", full)
    with pytest.raises(OSError) as e:
        make(data, tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(tmp_path / "cache" / "index") in msg and ".raw" in msg
    assert not [p for p in (tmp_path / "cache" / "index").iterdir() if p.is_dir()]  # nothing half-built left behind
