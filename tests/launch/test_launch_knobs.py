"""Launcher knobs for multi-node GPU runs: network interface variables reach every rank, and the
Slurm script gives each node's launcher all of the node's CPUs (srun stand-in on PATH)."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from tests.launch.conftest import DEMO, REPO, launch_env


def test_interface_variables_reach_every_rank(tmp_path):
    env = launch_env(NPROC_PER_NODE="2", IFNAME="lo", NCCL_IB_HCA="mlx5_0", PROBE_OUT=str(tmp_path),
                     LAUNCH_MODULE="tests.launch.env_probe")
    env.pop("NCCL_SOCKET_IFNAME", None)
    env.pop("GLOO_SOCKET_IFNAME", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), str(DEMO), "train.max_steps=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for values in ranks:
        assert values["NCCL_SOCKET_IFNAME"] == "lo" and values["GLOO_SOCKET_IFNAME"] == "lo"
        assert values["NCCL_IB_HCA"] == "mlx5_0"
        assert values["argv"] == [str(DEMO), "train.max_steps=1"]
    assert "NCCL_SOCKET_IFNAME=lo" in proc.stderr  # logged at start


def test_interface_variables_set_by_the_user_win(tmp_path):
    env = launch_env(NPROC_PER_NODE="1", IFNAME="lo", GLOO_SOCKET_IFNAME="eth9", PROBE_OUT=str(tmp_path),
                     LAUNCH_MODULE="tests.launch.env_probe")
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), str(DEMO)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = json.loads((tmp_path / "rank0.json").read_text())
    assert values["GLOO_SOCKET_IFNAME"] == "eth9" and values["NCCL_SOCKET_IFNAME"] == "lo"


def _fake_slurm(bin_dir, record):
    bin_dir.mkdir()
    for name, body in (
        ("srun", f'echo "$@" > {record}/srun_args; echo "$OMP_NUM_THREADS" > {record}/omp; exit 0'),
        ("scontrol", 'echo node1'),
    ):
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_sbatch(tmp_path, **extra):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    record.mkdir()
    _fake_slurm(bin_dir, record)
    env = launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_NNODES="1",
                     SLURM_JOB_NODELIST="node1", SLURM_GPUS_ON_NODE="8", DIFFTRON_NO_REQUEUE="1", **extra)
    env.pop("OMP_NUM_THREADS", None)
    if "SLURM_CPUS_PER_TASK" not in extra:
        env.pop("SLURM_CPUS_PER_TASK", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), str(DEMO), f"train.out_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return (record / "srun_args").read_text().split(), (record / "omp").read_text().strip()


def test_slurm_gives_the_launcher_the_nodes_cpus(tmp_path):
    args, omp = run_sbatch(tmp_path, SLURM_CPUS_ON_NODE="96")
    assert "--cpus-per-task=96" in args and "--export=ALL" in args
    assert omp == "12"  # 96 CPUs / 8 ranks


def test_slurm_cpus_per_task_given_explicitly_wins(tmp_path):
    args, omp = run_sbatch(tmp_path, SLURM_CPUS_ON_NODE="96", SLURM_CPUS_PER_TASK="64")
    assert "--cpus-per-task=64" in args and omp == "8"
