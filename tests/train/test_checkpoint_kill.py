"""kill -9 during checkpoint saves of a 2-rank run (a checkpoint every step), then resume: the
losses equal the uninterrupted run's. Each kill lands while a save's temporary folder exists
(at a random moment of it), so the save is cut at a random point: before or after some rank's
file, before ``.metadata``, before the rename or before ``latest``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.train.test_trainer_kill import _children, _env, _losses
from tests.train.test_main import OVERRIDES

STEPS = 10
KILL_OVERRIDES = [o for o in OVERRIDES if not o.startswith(("train.max_steps", "train.checkpoint_every"))] + [
    f"train.max_steps={STEPS}", "train.checkpoint_every=1", "train.keep_last=3",
]


def _cmd(out, shards, *extra):
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "train", str(REPO / "configs" / "demo.yaml"), *KILL_OVERRIDES,
        f"train.out_dir={out}", f"data.sources=[{{path: {shards}}}]", *extra,
    ]


def _temporaries(run_dir) -> set[str]:
    root = run_dir / "checkpoints"
    return {p.name for p in root.iterdir() if ".tmp-" in p.name} if root.is_dir() else set()


def _complete_run(run_dir, shards, *extra) -> dict[int, float]:
    """Run (or resume) to the end; every step's loss."""
    proc = subprocess.run(_cmd(run_dir, shards, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
def test_kill_9_during_saves_then_resume_matches_the_uninterrupted_run(tmp_path, embedded_shards):
    full = _complete_run(tmp_path / "full", embedded_shards)

    crash_dir = tmp_path / "crash"
    kills = 0  # kills that landed while a save of this launch was in progress
    for attempt in range(3):
        leftovers = _temporaries(crash_dir)  # of the previous kill: removed by the relaunch at start
        launcher = subprocess.Popen(_cmd(crash_dir, embedded_shards, *(["train.resume=true"] if attempt else [])),
                                    cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 900
            while not (_temporaries(crash_dir) - leftovers) and launcher.poll() is None:  # a save began
                assert time.monotonic() < deadline, "run too slow"
                time.sleep(0.001)
            if launcher.poll() is not None:  # finished before a save could be cut
                break
            time.sleep(random.uniform(0, 0.05))  # a random moment of the save
            ranks = _children(launcher.pid)
            if len(ranks) == 2:
                os.kill(random.choice(ranks), signal.SIGKILL)
                kills += 1
            launcher.communicate(timeout=900)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.communicate()
        if max(_losses(crash_dir), default=0) >= STEPS:
            break
    assert kills >= 2

    resumed = _complete_run(crash_dir, embedded_shards, "train.resume=true")
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=0), (kills, step, resumed, full)
    assert not _temporaries(crash_dir)  # leftovers of the cut saves were removed at the relaunches
