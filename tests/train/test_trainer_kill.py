"""Crash resume under torchrun: ``kill -9`` of one rank of a 2-rank run at a random step, then a
relaunch with ``train.resume=true``, ends with the losses of an uninterrupted 2-rank run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.test_main import OVERRIDES

FAULT_OVERRIDES = [o for o in OVERRIDES if not o.startswith(("train.max_steps", "train.checkpoint_every"))] + [
    "train.max_steps=30", "train.checkpoint_every=2", "train.keep_last=20",
]


def _cmd(out, shards, *extra):
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "train", str(REPO / "configs" / "demo.yaml"), *FAULT_OVERRIDES,
        f"train.out_dir={out}", f"data.sources=[{{path: {shards}}}]", *extra,
    ]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def _losses(run_dir) -> dict[int, float]:
    """step -> loss; a relaunch appends to metrics.jsonl, so the last record of a step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["step"]: r["loss"] for r in records}


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.slow
def test_kill_9_of_one_rank_then_resume_matches_the_uninterrupted_run(tmp_path, embedded_shards):
    full_dir = tmp_path / "full"
    proc = subprocess.run(_cmd(full_dir, embedded_shards), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full = _losses(full_dir)
    assert sorted(full) == list(range(1, 31))

    # > the first checkpoint (step 2), and early enough that the run is still going (tiny steps
    # take tens of milliseconds: 20+ steps are left when the kill lands)
    kill_after = random.choice(range(3, 10))
    crash_dir = tmp_path / "crash"
    launcher = subprocess.Popen(_cmd(crash_dir, embedded_shards), cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while max(_losses(crash_dir), default=0) < kill_after:
            assert launcher.poll() is None, f"run ended before step {kill_after}"
            assert time.monotonic() < deadline, "run too slow"
            time.sleep(0.02)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        os.kill(random.choice(ranks), signal.SIGKILL)
        output, _ = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, output[-3000:]
    assert max(_losses(crash_dir)) < 30, "the crashed run finished anyway"

    proc = subprocess.run(_cmd(crash_dir, embedded_shards, "train.resume=true"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resume: continuing from" in proc.stdout + proc.stderr
    resumed = _losses(crash_dir)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        # same layout, same keyed data and noise: the resumed run retraces the uninterrupted one
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=0), (kill_after, step, resumed, full)


@pytest.mark.slow
def test_kill_9_of_the_launcher_leaves_ranks_running_and_a_relaunch_is_refused(tmp_path, embedded_shards):
    """torchrun killed with -9 leaves its ranks training; a relaunch on the same train.out_dir must
    not train beside them: it fails at start with one line naming the process holding the folder."""
    out = tmp_path / "run"
    cmd = [c for c in _cmd(out, embedded_shards) if not c.startswith("train.max_steps")] + ["train.max_steps=100000"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.monotonic() + 900
        while max(_losses(out), default=0) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.kill()  # SIGKILL: the ranks are orphaned and keep training
        launcher.wait()
        before = max(_losses(out))
        relaunch = subprocess.run(_cmd(out, embedded_shards, "train.resume=true"), cwd=REPO, env=_env(),
                                  capture_output=True, text=True, timeout=900)
        assert max(_losses(out)) > before, "the orphaned ranks should still be training"
        assert relaunch.returncode != 0, relaunch.stderr[-3000:]
        refusal = [line for line in relaunch.stderr.splitlines() if "is in use by another run" in line]
        assert refusal and f"train.out_dir {out} is in use by another run (pid " in refusal[0], relaunch.stderr[-3000:]
        assert any(f"pid {pid} " in refusal[0] for pid in ranks), (refusal, ranks)  # names the holder: rank 0
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
