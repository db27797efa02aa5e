"""Fault tolerance: damaged checkpoints are detected and skipped on resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal

import torch

from tests.train.test_trainer import small_run
from train.checkpoint import MANIFEST, list_checkpoints, load_model_weights, newest_valid_checkpoint, save_checkpoint, verify_checkpoint
from train.engine import StepOutput


def _tiny_checkpoint(out_dir, step):
    return save_checkpoint(out_dir, step, model_state={"w": torch.arange(1000.0)}, optimizer_state={"x": torch.ones(3)},
                           trainer_state={}, config_yaml="model: {}\n", tokenizer_dir=None, keep_last=0)


def test_manifest_detects_truncation_corruption_and_missing_files(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, 1)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert set(files) >= {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.yaml"}
    assert verify_checkpoint(ckpt) is None
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    assert "truncated" in verify_checkpoint(ckpt) and "model.safetensors" in verify_checkpoint(ckpt)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert "corrupted" in verify_checkpoint(ckpt)
    weights.unlink()
    assert "missing" in verify_checkpoint(ckpt)


def test_newest_valid_checkpoint_falls_back_with_one_log_line(tmp_path):
    _tiny_checkpoint(tmp_path, 1)
    newest = _tiny_checkpoint(tmp_path, 2)
    lines = []
    assert newest_valid_checkpoint(tmp_path, log=lines.append) == newest
    assert lines == []
    (newest / "optimizer.pt").write_bytes(b"")
    assert newest_valid_checkpoint(tmp_path, log=lines.append).name == "step_00000001"
    assert len(lines) == 1 and "step_00000002" in lines[0] and "optimizer.pt" in lines[0]


def test_resume_skips_a_truncated_latest_checkpoint_and_reproduces_the_run(tmp_path, embedded_shards, capsys):
    common = ("train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=5")
    full = small_run(tmp_path / "full", embedded_shards, *common).fit()
    # a crashed run that saved steps 2 and 4, but step 4's weights were truncated afterwards
    crashed = tmp_path / "crashed" / "checkpoints"
    crashed.mkdir(parents=True)
    for step in (2, 4):
        name = f"step_{step:08d}"
        shutil.copytree(tmp_path / "full" / "checkpoints" / name, crashed / name)
    (crashed / "latest").write_text("step_00000004")
    weights = crashed / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    resumed = small_run(tmp_path / "crashed", embedded_shards, *common, "train.resume=true").fit()
    out = capsys.readouterr()
    assert "skipping damaged checkpoint step_00000004" in out.out + out.err
    assert "model.safetensors" in out.out + out.err
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == b["loss"], (a, b)
        assert a["grad_norm"] == b["grad_norm"]


def _nan_at(trainer, bad_step):
    """Make the row weights of step ``bad_step`` (1-based) NaN, so its loss and gradients are NaN."""
    original = trainer.micro_batches

    def patched(batch, step, **kw):
        mbs, times = original(batch, step, **kw)
        if step + 1 == bad_step:
            mbs = [dataclasses.replace(mb, row_weight=torch.full_like(mb.row_weight, float("nan"))) for mb in mbs]
        return mbs, times

    trainer.micro_batches = patched
    return trainer


def _no_update_at(trainer, bad_step):
    """Reference: at step ``bad_step`` the engine is not called at all (no update, no optimizer state change)."""
    original = trainer.engine.train_step

    def patched(mbs, lr):
        if trainer.step + 1 == bad_step:
            return StepOutput(float("nan"), float("nan"), torch.zeros(0))
        return original(mbs, lr)

    trainer.engine.train_step = patched
    return trainer


def test_a_nan_step_is_skipped_and_training_matches_a_run_without_that_update(tmp_path, embedded_shards, capsys):
    common = ("train.max_steps=5",)
    guarded = _nan_at(small_run(tmp_path / "nan", embedded_shards, *common), 3).fit()
    out = capsys.readouterr()
    assert "guard: step 3 skipped" in out.out + out.err
    reference = _no_update_at(small_run(tmp_path / "ref", embedded_shards, *common), 3).fit()
    assert [r["step"] for r in guarded] == [1, 2, 3, 4, 5]  # the step index still advances
    assert math.isnan(guarded[2]["loss"])
    assert [r["skipped_steps"] for r in guarded] == [0, 0, 1, 1, 1]
    for a, b in zip(guarded[3:], reference[3:]):
        assert a["loss"] == b["loss"], (a, b)
        assert a["grad_norm"] == b["grad_norm"]
    wa = load_model_weights(tmp_path / "nan")[1]
    wb = load_model_weights(tmp_path / "ref")[1]
    assert all(torch.isfinite(v).all() and torch.equal(v, wb[k]) for k, v in wa.items())


def test_without_the_guard_a_nan_step_poisons_the_weights(tmp_path, embedded_shards):
    _nan_at(small_run(tmp_path, embedded_shards, "train.max_steps=3", "train.guard_nonfinite=false"), 2).fit()
    weights = load_model_weights(tmp_path)[1]
    assert not all(torch.isfinite(v).all() for v in weights.values())


def test_sigterm_mid_run_saves_exits_and_resume_continues_exactly(tmp_path, embedded_shards):
    common = ("train.max_steps=6", "train.checkpoint_every=0")
    full = small_run(tmp_path / "full", embedded_shards, *common).fit()
    trainer = small_run(tmp_path / "cut", embedded_shards, *common)
    original = trainer.train_step

    def step_then_sigterm():
        values = original()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler: finish the step, save, return
        return values

    trainer.train_step = step_then_sigterm
    cut = trainer.fit()
    assert [r["step"] for r in cut] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000003"]
    resumed = small_run(tmp_path / "cut", embedded_shards, *common, "train.resume=true").fit()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in cut + resumed] == [r["loss"] for r in full]
