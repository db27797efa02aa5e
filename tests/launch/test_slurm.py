"""launch/slurm.sbatch under a real local Slurm cluster (Debian slurm-wlm + munge), brought up
by the fixtures in conftest.py: one node, two emulated nodes, and preemption -> checkpoint ->
requeue -> resume to completion."""

from __future__ import annotations

import time

import pytest

from tests.launch.conftest import DEMO, free_port, read_losses, tiny_overrides

pytestmark = pytest.mark.slow
SBATCH = "launch/slurm.sbatch"


def job_output(path) -> str:
    return path.read_text() if path.is_file() else "(no output file)"


def test_single_node_job_trains(slurm_one_node, tmp_path, embedded_shards, reference_losses):
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    jid = slurm_one_node.sbatch("-o", str(log), SBATCH, str(DEMO), *tiny_overrides(embedded_shards, out),
                                env={"MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"})
    state = slurm_one_node.wait(jid, timeout=600)
    text = job_output(log)
    assert state == "COMPLETED", text[-4000:]
    assert "training exited with 0, done" in text
    losses = read_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5)


def test_two_node_job_reproduces_single_node_losses(slurm_two_nodes, tmp_path, embedded_shards, reference_losses):
    out = tmp_path / "run2"
    log = tmp_path / "job2.out"
    jid = slurm_two_nodes.sbatch("-N2", "-o", str(log), SBATCH, str(DEMO), *tiny_overrides(embedded_shards, out),
                                 env={"MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"})
    state = slurm_two_nodes.wait(jid, timeout=900)
    text = job_output(log)
    assert state == "COMPLETED", text[-4000:]
    assert "on n[1-2], master n1:" in text
    assert "node 0/2" in text and "node 1/2" in text
    losses = read_losses(out)
    assert sorted(losses) == sorted(reference_losses)
    for step, loss in reference_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-5)


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_one_node, tmp_path, embedded_shards):
    out = tmp_path / "preempt"
    log = tmp_path / "preempt.out"
    max_steps = 200  # enough that the signal lands mid-run; the tiny steps are fast
    jid = slurm_one_node.sbatch("-o", str(log), SBATCH, str(DEMO),
                                *tiny_overrides(embedded_shards, out, max_steps=max_steps),
                                env={"MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        assert slurm_one_node.job_field(jid, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_output(log)
        time.sleep(0.2)
    # what a preemption (or --signal=B:USR1@120 before the time limit) delivers: USR1 to the batch shell
    slurm_one_node.run("scancel", "--signal=USR1", "--batch", jid)
    state = slurm_one_node.wait(jid, timeout=900)
    text = job_output(log)
    assert state == "COMPLETED", text[-4000:]
    assert "SIGUSR1 (preemption)" in text and f"requeueing job {jid}" in text, text[-4000:]
    assert slurm_one_node.job_field(jid, "Restarts") == "1"
    assert "restart 1" in text and "resume: continuing from" in text
    assert "training exited with 0, done" in text
    losses = read_losses(out)
    assert sorted(losses) == list(range(1, max_steps + 1))  # every step logged once, none lost
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{max_steps:08d}"
