"""`make gpu-check`'s CPU dry run: every command is built, the training config with its overrides
loads, the planner predicts the run's memory, and one JSON file is written."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, run_module


def test_dry_run_plans_the_whole_check(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("difftron-0.1.0-py3-none-any.whl", "deepspeed-0.19.8-py3-none-any.whl",
                 "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"):
        (wheels / name).write_bytes(b"")
    out = tmp_path / "gpu_check.json"
    proc = run_module(["tools/gpu_check.py", "--dry-run", "--wheels", str(wheels), "--out", str(out),
                       "--work", str(tmp_path / "work")])
    assert "dry run" in proc.stdout
    result = json.loads(out.read_text())
    cmds = result["commands"]
    assert set(cmds) == {"install", "prepare", "train_sdpa", "train_flash", "bench_layer", "bench_attention", "bench_step"}
    install = cmds["install"]
    assert "--no-index" in install and str(wheels) in install
    assert {"difftron", "deepspeed", "megatron-core"} <= set(install) and any(a.endswith("flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl") for a in install)
    train = cmds["train_flash"]
    assert train[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    for expected in ("model.d_model=4096", "model.n_layers=2", "train.seq_len=4096", "train.max_steps=20",
                     "train.precision=bf16", "train.attention_backend=flash", "parallel.zero_stage=1"):
        assert expected in train, expected
    for bench in ("layer", "attention", "step"):
        assert cmds[f"bench_{bench}"][-3:] == ["-m", "tools.bench", bench] or cmds[f"bench_{bench}"][-1] == bench
    planner = result["planner"]
    assert 5 < planner["total_gb"] < 80 and set(planner["parts_gb"]) >= {"weights", "activations", "logits"}


def test_missing_wheels_and_no_gpu_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--wheels", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "make gpu-wheels" in proc.stderr
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--no-install", "--out", str(tmp_path / "x.json")],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
