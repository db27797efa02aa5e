"""Which attention kernel a run uses: resolved and logged at start; an explicit external kernel
that cannot run is a one-line error at start, not a silent fallback or a mid-step traceback."""

from __future__ import annotations

import pytest
import torch

from model.attention import external_kernel, resolve_backend
from tests.conftest import REPO, run_module


def test_auto_resolves_to_sdpa_on_cpu():
    line = resolve_backend("auto", "cpu", torch.float32)
    assert line.startswith("auto -> sdpa") and "\n" not in line
    assert resolve_backend("sdpa", "cpu", torch.bfloat16).startswith("sdpa")


@pytest.mark.skipif(external_kernel("flash") is not None, reason="flash-attn is installed here")
def test_explicit_flash_without_flash_attn_is_one_line():
    with pytest.raises(ValueError, match="needs flash_attn") as info:
        resolve_backend("flash", "cuda", torch.bfloat16)
    assert "\n" not in str(info.value)


def test_explicit_kernel_on_cpu_fails():
    with pytest.raises(ValueError):
        resolve_backend("sdpa_flash", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("nope", "cpu", torch.float32)


COMMON = ["train.max_steps=1", "train.checkpoint_every=0", "logging.wandb=disabled", "logging.progress_bar=false",
          "eval.every=0"]


def test_train_logs_the_kernel_and_rejects_flash_at_start(tmp_path, embedded_shards):
    data = f"data.sources=[{{path: {embedded_shards}}}]"
    proc = run_module(["-m", "train", str(REPO / "configs" / "demo.yaml"), *COMMON, data, f"train.out_dir={tmp_path / 'a'}"])
    assert "attention: auto -> sdpa" in proc.stdout + proc.stderr
    if external_kernel("flash") is None:
        proc = run_module(["-m", "train", str(REPO / "configs" / "demo.yaml"), *COMMON, data,
                           f"train.out_dir={tmp_path / 'b'}", "train.attention_backend=flash"], check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error: train.attention_backend=flash:"), proc.stderr
        assert not (tmp_path / "b" / "metrics.jsonl").exists()
