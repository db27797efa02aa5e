"""One rank reading a remote shard directory through the node's shared cache.

The remote is ``countingfs://PATH``: the local filesystem under another protocol, so it goes
through :class:`data.sources.ShardCache`, with every download logged to ``$COUNTING_FS_LOG``.
Usage: python -m tests.data.remote_worker PATH CACHE RANK DP STEPS
Checks that every batch equals the one read from PATH directly.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "countingfs"


class CountingFS(LocalFileSystem):
    protocol = (PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name):
        return f"{PROTOCOL}://{name}"

    def get_file(self, rpath, lpath, **kwargs):
        with open(os.environ["COUNTING_FS_LOG"], "a") as f:
            f.write(f"{os.getpid()} {threading.current_thread().name} {self._strip_protocol(rpath)}\n")
        time.sleep(float(os.environ.get("COUNTING_FS_DELAY", "0")))  # a slow network: downloads overlap
        return super().get_file(rpath, lpath, **kwargs)


def register() -> None:
    fsspec.register_implementation(PROTOCOL, CountingFS, clobber=True)


def main(path: str, cache: str, rank: int, dp: int, steps: int) -> None:
    from data.config import DataConfig, SourceConfig
    from data.loader import build_loader

    register()
    kw = dict(seq_len=16, global_batch_size=8 * dp, dp_rank=rank, dp_size=dp, seed=3)
    remote = build_loader(DataConfig(sources=[SourceConfig(path=f"{PROTOCOL}://{path}")], cache_dir=cache), **kw)
    local = build_loader(DataConfig(sources=[SourceConfig(path=path)], verify_checksums=False), **kw)
    open(os.path.join(cache, f"ready-{rank}"), "w").close()  # start the steps together
    deadline = time.time() + 300
    while sum(os.path.exists(os.path.join(cache, f"ready-{r}")) for r in range(dp)) < dp and time.time() < deadline:
        time.sleep(0.02)
    for s in range(steps):
        assert torch.equal(remote.batch(s)["input_ids"], local.batch(s)["input_ids"]), (rank, s)
    remote.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]))
