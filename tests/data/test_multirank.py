"""Under torchrun with 2 ranks (gloo): the union of each step's samples equals the one-process
loader's batch and a resumed loader reproduces the next batches exactly (checked inside the worker
on every rank). The one-process reference is computed here, without a torchrun launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("multirank_worker.py")


def launch(nproc: int, shards: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(shards), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun with {nproc} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_one_and_two_ranks_see_the_same_samples(shard_dir, tmp_path):
    from tests.data.multirank_worker import STEPS, make_loader

    ld = make_loader(shard_dir)
    one = {"steps": [ld.batch(step)["input_ids"].tolist() for step in range(STEPS)],
           "validation": make_loader(shard_dir, split="validation").batch(0)["input_ids"].tolist()}
    two = launch(2, shard_dir, tmp_path / "two.json")
    assert two["world"] == 2 and two["resume_ok"]
    assert len(one["steps"]) == 6 and all(len(s) == 8 for s in one["steps"])
    assert one["steps"] == two["steps"]
    assert one["validation"] == two["validation"]
    assert one["steps"][0] != one["steps"][1]
