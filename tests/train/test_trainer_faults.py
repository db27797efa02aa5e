"""Fault tolerance: damaged checkpoints are detected and skipped on resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal

import pytest
import torch

from tests.train.test_trainer import small_run
from train.checkpoint import (
    MANIFEST,
    CheckpointError,
    list_checkpoints,
    load_model_weights,
    load_state,
    newest_valid_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    whole,
)
from train.engine import StepOutput
from train.guards import GuardError


def _tiny_checkpoint(out_dir, step):
    state = {"model/w": whole(torch.arange(1000.0)), "optim/w/exp_avg": whole(torch.ones(1000))}
    return save_checkpoint(out_dir, step, state=state, trainer_state={}, config_yaml="model: {}\n", tokenizer_dir=None, keep_last=0)


def _flip_byte(path, where=None):
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if where is None else where
    data[where] ^= 0x40
    path.write_bytes(bytes(data))


def test_manifest_detects_truncation_corruption_and_missing_files(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, 1)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert set(manifest["files"]) >= {"rng.pt", "state.json", "config.yaml", "dcp/.metadata", "dcp/checksums.json"}
    assert set(manifest["data"]) == {"dcp/__0_0.distcp"}
    assert verify_checkpoint(ckpt) is None
    weights = ckpt / "dcp" / "__0_0.distcp"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    assert "truncated" in verify_checkpoint(ckpt) and "__0_0.distcp" in verify_checkpoint(ckpt)
    weights.write_bytes(data)
    _flip_byte(ckpt / "state.json", 3)
    assert "corrupted" in verify_checkpoint(ckpt) and "state.json" in verify_checkpoint(ckpt)
    _flip_byte(ckpt / "state.json", 3)
    weights.unlink()
    assert "missing" in verify_checkpoint(ckpt)


def test_a_flipped_data_byte_is_caught_by_the_reader(tmp_path):
    """Same size, one byte flipped in the tensor data: the reader's CRC-32 of that chunk fails."""
    ckpt = _tiny_checkpoint(tmp_path, 1)
    _flip_byte(ckpt / "dcp" / "__0_0.distcp")
    assert verify_checkpoint(ckpt) is None  # sizes only: the data's CRCs are checked as it is read
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp fails its CRC-32 check") as err:
        load_state(ckpt, {"model/w": whole(torch.zeros(1000)), "optim/w/exp_avg": whole(torch.zeros(1000))})
    assert "\n" not in str(err.value)


def test_newest_valid_checkpoint_falls_back_with_one_log_line(tmp_path):
    _tiny_checkpoint(tmp_path, 1)
    newest = _tiny_checkpoint(tmp_path, 2)
    lines = []
    assert newest_valid_checkpoint(tmp_path, log=lines.append) == newest
    assert lines == []
    (newest / "rng.pt").write_bytes(b"")
    assert newest_valid_checkpoint(tmp_path, log=lines.append).name == "step_00000001"
    assert len(lines) == 1 and "step_00000002" in lines[0] and "rng.pt" in lines[0]


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no_manifest"])
def test_resume_skips_a_damaged_latest_checkpoint_and_reproduces_the_run(tmp_path, embedded_shards, capsys, damage):
    common = ("train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=5")
    full = small_run(tmp_path / "full", embedded_shards, *common).fit()
    # a crashed run that saved steps 2 and 4, but step 4's weights were damaged afterwards
    crashed = tmp_path / "crashed" / "checkpoints"
    crashed.mkdir(parents=True)
    for step in (2, 4):
        name = f"step_{step:08d}"
        shutil.copytree(tmp_path / "full" / "checkpoints" / name, crashed / name)
    (crashed / "latest").write_text("step_00000004")
    weights = crashed / "step_00000004" / "dcp" / "__0_0.distcp"
    if damage == "flipped":  # same size: found by the reader's CRC-32, not by the manifest
        _flip_byte(weights)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if damage == "no_manifest":
        (crashed / "step_00000004" / MANIFEST).unlink()
    capsys.readouterr()
    resumed = small_run(tmp_path / "crashed", embedded_shards, *common, "train.resume=true").fit()
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "skipping damaged checkpoint" in line]
    assert len(lines) == 1 and "step_00000004" in lines[0], out
    assert ("manifest.json" if damage == "no_manifest" else "__0_0.distcp") in lines[0]
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

    def patched(mbs, lr, **kw):
        if trainer.step + 1 == bad_step:
            return StepOutput(float("nan"), float("nan"), torch.zeros(0), skipped=True, skip_reason="nonfinite")
        return original(mbs, lr, **kw)

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


def _spike_at(trainer, data_steps, factor=30.0):
    """Scale the loss (and gradients) of the given data steps (0-based) by ``factor``: a loss spike."""
    original = trainer.micro_batches

    def patched(batch, step, **kw):
        mbs, times = original(batch, step, **kw)
        if step in data_steps:
            mbs = [dataclasses.replace(mb, row_weight=mb.row_weight * factor) for mb in mbs]
        return mbs, times

    trainer.micro_batches = patched
    return trainer


GUARD = ("guard.spike_warmup=3", "guard.t_buckets=4", "train.random_length_prob=0")


def _events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_loss_spike_is_skipped_and_training_matches_a_run_without_that_update(tmp_path, embedded_shards, capsys):
    common = ("train.max_steps=9", *GUARD)
    guarded = _spike_at(small_run(tmp_path / "spike", embedded_shards, *common), {6}).fit()
    out = capsys.readouterr().out
    assert "guard: step 7 skipped (spike:" in out
    reference = _no_update_at(small_run(tmp_path / "ref", embedded_shards, *common), 7).fit()
    assert [r["skipped_spike"] for r in guarded] == [0] * 6 + [1] * 3
    assert [r["skipped_nonfinite"] for r in guarded] == [0] * 9
    assert guarded[6]["spike_z"] > 6 and all(abs(r["spike_z"]) < 6 for r in guarded[3:6] + guarded[7:])
    for a, b in zip(guarded[7:], reference[7:]):
        assert a["loss"] == b["loss"], (a, b)
    wa, wb = load_model_weights(tmp_path / "spike")[1], load_model_weights(tmp_path / "ref")[1]
    assert all(torch.equal(v, wb[k]) for k, v in wa.items())
    [event] = _events(tmp_path / "spike")
    assert event["event"] == "skip" and event["reason"] == "spike" and event["step"] == 7 and event["data_step"] == 6


def test_k_spikes_in_a_row_roll_back_and_skip_the_data_window(tmp_path, embedded_shards, capsys):
    common = ("train.max_steps=10", "train.checkpoint_every=2", "train.keep_last=10", "guard.rollback_after=2", *GUARD)
    # data steps 6 and 7 (optimizer steps 7 and 8) spike: roll back to step 6, never train on them again
    run = _spike_at(small_run(tmp_path / "rb", embedded_shards, *common), {6, 7}).fit()
    out = capsys.readouterr().out
    assert "rolled back from step 8 to step_00000006; data steps 6..7 will be skipped" in out
    assert [r["step"] for r in run] == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10]
    assert [r["data_step"] for r in run] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert run[-1]["skipped_spike"] == 2 and run[-1]["rollbacks"] == 1
    events = _events(tmp_path / "rb")
    assert [(e["event"], e.get("reason")) for e in events] == [("skip", "spike"), ("skip", "spike"), ("rollback", None)]
    assert events[2]["checkpoint"] == "step_00000006" and events[2]["skip_window"] == [6, 8]
    # reference: a run that skips data steps 6..7 from the start, with no faults
    ref_trainer = small_run(tmp_path / "ref", embedded_shards, *common)
    ref_trainer.run_guard.skip_windows = [[6, 8]]
    ref = ref_trainer.fit()
    assert [r["data_step"] for r in ref] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert [r["loss"] for r in run[8:]] == [r["loss"] for r in ref[6:]]
    wa, wb = load_model_weights(tmp_path / "rb")[1], load_model_weights(tmp_path / "ref")[1]
    assert all(torch.equal(v, wb[k]) for k, v in wa.items())
    # the final checkpoint carries the window and the counters; a resume would keep skipping it
    state = json.loads((tmp_path / "rb" / "checkpoints" / "step_00000010" / "state.json").read_text())
    assert state["skip_windows"] == [[6, 8]] and state["guard_counts"] == {"nonfinite": 0, "spike": 2, "rollbacks": 1}
    assert state["data_step"] == 12
    # the rollback target was re-saved with the window: a crash right after the rollback resumes past it
    state = json.loads((tmp_path / "rb" / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["skip_windows"] == [[6, 8]] and state["data_step"] == 6 and state["guard_counts"]["rollbacks"] == 1


def test_k_bad_steps_with_no_checkpoint_to_roll_back_to_stop_with_a_clear_error(tmp_path, embedded_shards):
    common = ("train.max_steps=6", "train.checkpoint_every=0", "guard.rollback_after=2", *GUARD)
    trainer = _nan_at(small_run(tmp_path, embedded_shards, *common), 2)
    original = trainer.micro_batches

    def two_nans(batch, step, **kw):  # data steps 1 and 2 (optimizer steps 2 and 3)
        mbs, times = original(batch, step, **kw)
        if step == 2:
            mbs = [dataclasses.replace(mb, row_weight=torch.full_like(mb.row_weight, float("nan"))) for mb in mbs]
        return mbs, times

    trainer.micro_batches = two_nans
    with pytest.raises(GuardError, match=r"guard: 2 skipped steps in a row \(data steps 1\.\.2\) and no checkpoint"):
        trainer.fit()


def test_without_the_guard_a_nan_step_poisons_the_weights(tmp_path, embedded_shards):
    _nan_at(small_run(tmp_path, embedded_shards, "train.max_steps=3", "guard.nonfinite=false"), 2).fit()
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


def test_a_failed_collective_names_its_likely_cause():
    from train.trainer import likely_cause

    assert "stopped taking part" in likely_cause("[gloo] Timed out waiting 5000ms for recv operation to complete")
    assert "died or was killed" in likely_cause("[gloo] Connection closed by peer [127.0.0.1]:1234")
    assert "disagree on the layout" in likely_cause("Mismatch between collective operation sizes")
    assert "died or was killed" in likely_cause("something else") and "layout/config" in likely_cause("something else")
