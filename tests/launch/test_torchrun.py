"""launch/torchrun.sh: argument errors (fast), two "nodes" on one machine reproducing the
single-node losses, and SIGUSR1 -> checkpoint -> resume (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.launch.conftest import DEMO, REPO, free_port, launch_env, read_losses, tiny_overrides

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")


def run_sh(args, env=None, timeout=60):
    return subprocess.run(["bash", TORCHRUN_SH, *args], cwd=REPO, env=env or launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_help_and_errors():
    proc = run_sh(["--help"])
    assert proc.returncode == 0 and "NNODES" in proc.stdout and "MASTER_ADDR" in proc.stdout
    proc = run_sh([])
    assert proc.returncode != 0
    proc = run_sh(["/nonexistent/config.yaml"])
    assert proc.returncode == 2 and "error: config file not found: /nonexistent/config.yaml" in proc.stderr
    proc = run_sh([str(DEMO)], env=launch_env(NNODES="2", NODE_RANK="2"))
    assert proc.returncode == 2 and "NODE_RANK (2) must be < NNODES (2)" in proc.stderr
    proc = run_sh([str(DEMO)], env=launch_env(NPROC_PER_NODE="two"))
    assert proc.returncode == 2 and "NPROC_PER_NODE must be a non-negative integer" in proc.stderr


@pytest.mark.slow
def test_two_nodes_on_one_machine_reproduce_single_node_losses(tmp_path, embedded_shards, reference_losses):
    port = str(free_port())
    out = tmp_path / "two_nodes"
    args = [str(DEMO), *tiny_overrides(embedded_shards, out)]
    procs = [
        subprocess.Popen(["bash", TORCHRUN_SH, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=launch_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                        NPROC_PER_NODE="1"))
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank} failed:\n{text[-4000:]}"
    assert "node 0/2" in outputs[0] and "node 1/2" in outputs[1]
    losses = read_losses(out)
    assert sorted(losses) == sorted(reference_losses) == [1, 2, 3, 4]
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.slow
def test_usr1_checkpoints_and_resume_continues(tmp_path, embedded_shards):
    out = tmp_path / "preempt"
    args = [str(DEMO), *tiny_overrides(embedded_shards, out, max_steps=400)]
    proc = subprocess.Popen(["bash", TORCHRUN_SH, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=launch_env(NPROC_PER_NODE="2"))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    os.kill(proc.pid, signal.SIGUSR1)  # the launcher shell: it forwards to the ranks
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-4000:]
    assert "SIGUSR1 -> ranks" in text
    saved = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(saved.split("_")[1])
    assert 2 <= stopped_at < 400
    assert max(read_losses(out)) == stopped_at
    # resume to a nearby end: the run continues from the checkpoint, not from step 0
    end = stopped_at + 2
    args = [str(DEMO), *tiny_overrides(embedded_shards, out, max_steps=end, **{"train.resume": "true"})]
    done = run_sh(args, env=launch_env(NPROC_PER_NODE="2"), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"step {stopped_at}" in done.stdout + done.stderr  # "resume: continuing from ... (step N)"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{end:08d}"
    assert max(read_losses(out)) == end
