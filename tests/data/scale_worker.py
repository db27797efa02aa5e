"""One rank of the scale test: start the train and validation loaders, run steps, report RSS and fds.

Usage: python -m tests.data.scale_worker ROOT RANK DP MAX_OPEN STEPS OUT.json [CACHE_DIR]
(RANK -1: only build the index, as the first rank of a node would.)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main(root: str, rank: int, dp: int, max_open: int, steps: int, out: str, cache_dir: str | None = None) -> None:
    import numpy as np
    import torch  # noqa: F401  (imported by the trainer anyway; not the loader's memory)

    from data.config import DataConfig, SourceConfig
    from data.loader import build_loader

    cfg = DataConfig(sources=[SourceConfig(path=root)], max_open_shards=max_open, cache_dir=cache_dir)
    gbs, seq = 64, 64
    rss0, fds0, cpu0, t0 = rss_mb(), open_fds(), time.process_time(), time.perf_counter()
    make = lambda split: build_loader(cfg, seq_len=seq, global_batch_size=gbs, dp_rank=max(rank, 0), dp_size=dp, seed=1, split=split)  # noqa: E731
    train = make("train")
    if rank < 0:
        json.dump({"build_s": time.perf_counter() - t0, "build_cpu_s": time.process_time() - cpu0,
                   "build_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss0_mb": rss0}, open(out, "w"))
        return
    val = make("validation")
    startup, startup_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss1 = rss_mb()
    max_fds = 0
    for s in range(steps):
        b = train.batch(s)
        assert b["input_ids"].shape == (gbs // dp, seq)
        if s % 100 == 0:
            val.batch(s // 100)
        max_fds = max(max_fds, open_fds() - fds0)
    rss2 = rss_mb()
    json.dump({
        "rank": rank, "startup_s": startup, "startup_cpu_s": startup_cpu, "rss_before_mb": rss0,
        "rss_loader_mb": rss1 - rss0, "rss_after_steps_mb": rss2 - rss0, "max_new_fds": max_fds,
        "open_shards": train.open_files() + val.open_files(), "num_samples": train.num_samples(),
        "val_samples": val.num_samples(), "steps": steps, "sum": int(np.int64(b["input_ids"].sum())),
    }, open(out, "w"))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5], a[6] if len(a) > 6 else None)
