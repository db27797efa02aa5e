"""Preemption under torchrun: a signal that reaches only some ranks (SIGUSR1 to one rank, as when
Slurm signals one node's processes) stops every rank after the same step; the checkpoint is
saved, every rank and the launcher exit 0, a ``preempted`` event is written, and a relaunch with
``train.resume=true`` retraces the uninterrupted run exactly. The same through launch/torchrun.sh,
including SIGTERM to torchrun itself and Ctrl-C (SIGINT) to the script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.test_trainer_kill import _children, _losses
from tests.train.test_main import OVERRIDES

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
BASE = [o for o in OVERRIDES if not o.startswith("train.max_steps")]


def _args(out, shards, max_steps, *extra):
    return [str(REPO / "configs" / "demo.yaml"), *BASE, f"train.max_steps={max_steps}",
            f"train.out_dir={out}", f"data.sources=[{{path: {shards}}}]", *extra]


def _torchrun(out, shards, max_steps, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "train", *_args(out, shards, max_steps, *extra)]


def _torchrun_sh(out, shards, max_steps, *extra):
    return ["bash", TORCHRUN_SH, *_args(out, shards, max_steps, *extra)]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHON=sys.executable, NPROC_PER_NODE="2", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _ranks(pid: int) -> dict[int, int]:
    """rank -> pid of the training processes below ``pid`` (torchrun, or the script's torchrun)."""
    found, todo = {}, [pid]
    while todo:
        for kid in _children(todo.pop()):
            rank = _rank_of(kid)
            if rank is not None and "torch.distributed.run" not in Path(f"/proc/{kid}/cmdline").read_bytes().decode(errors="replace"):
                found[rank] = kid
            else:
                todo.append(kid)
    return found


def _run_then_signal(cmd, out, *, after_step, target, sig):
    """Start ``cmd``; once step ``after_step`` is logged send ``sig`` to ``target(proc)``'s pids."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while max(_losses(out), default=0) < after_step:
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "run too slow"
            time.sleep(0.05)
        for pid in target(proc):
            os.kill(pid, sig)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output


def _preempted(out) -> list[dict]:
    path = Path(out) / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [e for e in events if e["event"] == "preempted"]


def _latest_step(out) -> int:
    return int((Path(out) / "checkpoints" / "latest").read_text().strip().split("_")[1])


def _resume_and_compare(cmd_of, out, shards, tmp_path, stops):
    """Relaunch to two steps past the last stop; the losses equal an uninterrupted run's."""
    end = max(stops) + 2
    proc = subprocess.run(cmd_of(out, shards, end, "train.resume=true"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"(step {max(stops)})" in proc.stdout + proc.stderr  # resume: continuing from ... (step N)
    full_dir = tmp_path / "uninterrupted"
    proc = subprocess.run(_torchrun(full_dir, shards, end), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    full, resumed = _losses(full_dir), _losses(out)
    assert sorted(resumed) == sorted(full) == list(range(1, end + 1))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=0), (step, stops, resumed, full)


@pytest.mark.slow
@pytest.mark.parametrize("signalled_rank", [1])
def test_sigusr1_to_one_rank_stops_every_rank_and_resumes_exactly(tmp_path, embedded_shards, signalled_rank):
    out = tmp_path / "run"
    rc, output = _run_then_signal(
        _torchrun(out, embedded_shards, 400), out, after_step=3, sig=signal.SIGUSR1,
        target=lambda proc: [_ranks(proc.pid)[signalled_rank]],
    )
    assert rc == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    stop = _latest_step(out)
    assert 3 <= stop < 400 and max(_losses(out)) == stop
    events = _preempted(out)
    assert len(events) == 1 and events[0]["step"] == stop and events[0]["signal"] == int(signal.SIGUSR1), events
    _resume_and_compare(_torchrun, out, embedded_shards, tmp_path, [stop])


@pytest.mark.slow
def test_torchrun_sh_exits_0_on_one_rank_sigusr1_on_sigterm_to_torchrun_and_on_ctrl_c(tmp_path, embedded_shards):
    out = tmp_path / "run"
    stops = []
    cases = [
        # SIGUSR1 to rank 0 only (the logging rank)
        (signal.SIGUSR1, lambda proc: [_ranks(proc.pid)[0]], "signal SIGUSR1: saved"),
        # SIGTERM to torchrun itself (not the script): torchrun forwards it and reports a failure
        (signal.SIGTERM, lambda proc: [k for k in _children(proc.pid)], "saved and stopped cleanly; exiting 0"),
        # Ctrl-C: SIGINT to the script, which forwards it to the ranks
        (signal.SIGINT, lambda proc: [proc.pid], "SIGINT -> ranks"),
    ]
    for i, (sig, target, expected) in enumerate(cases):
        extra = ["train.resume=true"] if i else []
        after = (stops[-1] if stops else 0) + 2
        rc, output = _run_then_signal(_torchrun_sh(out, embedded_shards, 400, *extra), out, after_step=after,
                                      sig=sig, target=target)
        assert rc == 0, (sig, output[-4000:])
        assert expected in output, (sig, output[-4000:])
        stops.append(_latest_step(out))
        assert stops[-1] >= after and max(_losses(out)) == stops[-1], (sig, stops)
        assert [e["step"] for e in _preempted(out)] == stops
    assert [e["signal"] for e in _preempted(out)] == [int(signal.SIGUSR1), int(signal.SIGTERM), int(signal.SIGINT)]
    _resume_and_compare(_torchrun_sh, out, embedded_shards, tmp_path, stops)
