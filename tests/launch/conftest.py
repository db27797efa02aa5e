"""Fixtures for the launcher tests: tiny-run overrides, a free port, local Slurm clusters."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UP_SH = REPO / "launch" / "slurm_local" / "up.sh"
DOWN_SH = REPO / "launch" / "slurm_local" / "down.sh"
DEMO = REPO / "configs" / "demo.yaml"
# slurmctld/slurmd ports of the test clusters: away from Slurm's defaults (6817/6818) so a real
# or leaked cluster on this machine does not collide. 1-node cluster: 6947-6948; 2-node: 6957-6959.
SLURM_PORTS = {1: 6947, 2: 6957}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """Environment for launcher subprocesses: this interpreter, one thread, no wandb."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def tiny_overrides(shards: Path, out_dir: Path, max_steps: int = 4, **more) -> list[str]:
    """The demo's tiny model, shrunk to a few fast steps on the embedded shards."""
    values = {
        "data.sources": f"[{{path: {shards}}}]",
        "train.out_dir": str(out_dir),
        "train.max_steps": max_steps,
        "train.seq_len": 64,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 8,
        "train.checkpoint_every": 0,
        "logging.wandb": "disabled",
        "logging.progress_bar": "false",
        "logging.log_every": 1,
        "eval.every": 0,
    }
    values.update(more)
    return [f"{k}={v}" for k, v in values.items()]


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (the last record of a step wins)."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory, embedded_shards) -> dict[int, float]:
    """Losses of the tiny run as one plain process (``python -m train``), the single-node truth."""
    out = tmp_path_factory.mktemp("launch_ref")
    proc = subprocess.run(
        [sys.executable, "-m", "train", str(DEMO), *tiny_overrides(embedded_shards, out)],
        cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_losses(out)


# ----- Slurm ------------------------------------------------------------------------------------
def _slurm_installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


@pytest.fixture(scope="session")
def slurm_installed() -> None:
    """Debian's slurm-wlm + munge, installed here when missing (needs root and apt)."""
    if _slurm_installed():
        return
    if os.geteuid() != 0:
        pytest.skip("slurm-wlm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ("apt-get update -qq && apt-get install -y -qq --no-install-recommends "
           "slurmctld slurmd slurm-client munge")
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not _slurm_installed():
        pytest.skip(f"installing slurm-wlm + munge with apt-get failed: {proc.stderr.strip()[-300:]}")


class SlurmCluster:
    def __init__(self, nnodes: int) -> None:
        self.nnodes = nnodes
        # not tmp_path: munged refuses a socket below pytest's 0700 folder
        self.scratch = Path(tempfile.mkdtemp(prefix=f"difftron-slurm{nnodes}-", dir=tempfile.gettempdir()))
        os.chmod(self.scratch, 0o755)
        self.env = launch_env(SLURM_CONF=str(self.scratch / "slurm.conf"))
        self.port = SLURM_PORTS[nnodes]

    def up(self) -> None:
        env = dict(self.env, SLURM_LOCAL_PORT=str(self.port))
        proc = subprocess.run(["bash", str(UP_SH), str(self.scratch), str(self.nnodes)], env=env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            self.down()
            raise AssertionError(f"local Slurm cluster did not start:\n{proc.stdout}\n{proc.stderr[-3000:]}")

    def down(self) -> None:
        subprocess.run(["bash", str(DOWN_SH), str(self.scratch)], env=self.env, timeout=60)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self, *args: str, timeout: int = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def wait(self, job_id: str, timeout: float = 600) -> str:
        """Wait until the job leaves the queue for good; returns its final JobState."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job_field(job_id, 'JobState')} after {timeout}s")


def _cluster(nnodes: int):
    cluster = SlurmCluster(nnodes)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def slurm_one_node(slurm_installed):
    yield from _cluster(1)


@pytest.fixture(scope="module")
def slurm_two_nodes(slurm_installed):
    yield from _cluster(2)
