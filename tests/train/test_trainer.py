"""The single-process loop: loss falls, exact resume, checkpoint files, bf16 and eval."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import REPO
from train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_model_weights, save_checkpoint, whole
from train.config import load_config
from train.trainer import Trainer

DEMO = REPO / "configs" / "demo.yaml"


def small_run(out_dir, shards, *extra: str):
    overrides = [
        f"train.out_dir={out_dir}", f"data.sources=[{{path: {shards}}}]", "logging.wandb=disabled",
        "logging.progress_bar=false", "eval.every=0", "model.n_layers=2", "model.d_model=64",
        "model.mlp_hidden_size=128", "train.seq_len=64", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.warmup_steps=2", "train.decay_steps=0", "logging.log_every=1", *extra,
    ]
    return Trainer(load_config(DEMO, overrides))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, embedded_shards):
    # random_length_prob=0.5 makes sure truncated steps are resumed exactly too
    common = ("train.max_steps=8", "train.checkpoint_every=4", "train.keep_last=5", "train.random_length_prob=0.5")
    full = small_run(tmp_path / "full", embedded_shards, *common).fit()
    # stop at step 4: a run folder that holds only what existed after step 4
    stopped = tmp_path / "stopped" / "checkpoints"
    stopped.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000004", stopped / "step_00000004")
    (stopped / "latest").write_text("step_00000004")
    resumed = small_run(tmp_path / "stopped", embedded_shards, *common, "train.resume=true").fit()
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert {r["seq_len"] for r in full} != {64}  # some steps used a random length
    for a, b in zip(full[4:], resumed):
        assert a["seq_len"] == b["seq_len"]
        assert a["loss"] == b["loss"], (a, b)
        assert a["grad_norm"] == b["grad_norm"]
    wa = load_model_weights(tmp_path / "full")[1]
    wb = load_model_weights(tmp_path / "stopped")[1]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_contents_and_metrics(tmp_path, embedded_shards):
    trainer = small_run(tmp_path, embedded_shards, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=2")
    trainer.fit()
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_00000002", "step_00000003"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000003"
    for name in ("dcp/.metadata", "dcp/__0_0.distcp", "manifest.json", "state.json", "rng.pt", "config.yaml", "tokenizer"):
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "loss_t0", "loss_t4"):
        assert key in records[0], key
    assert not any(p.name.startswith("step_") and ".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_save_checkpoint_is_atomic_when_writing_fails(tmp_path):
    state = {"model/w": whole(torch.ones(2))}
    save_checkpoint(tmp_path, 1, state=state, trainer_state={}, config_yaml="model: {}\n", tokenizer_dir=None)
    with pytest.raises(CheckpointError):  # the tokenizer folder is gone: the last file fails
        save_checkpoint(tmp_path, 2, state=state, trainer_state={}, config_yaml="", tokenizer_dir=tmp_path / "gone")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]  # no .tmp-


def test_bf16_and_in_training_eval(tmp_path, embedded_shards):
    history = small_run(
        tmp_path, embedded_shards, "train.max_steps=2", "train.precision=bf16", "eval.every=1", "eval.batches=1"
    ).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert history[0]["eval_bound"] > 0
    # fixed eval noise: evaluating the same weights twice gives the same bound
    trainer = small_run(tmp_path / "again", embedded_shards, "train.max_steps=1", "eval.every=1", "eval.batches=1")
    assert trainer.evaluate() == trainer.evaluate()


@pytest.mark.slow
def test_demo_loss_falls_clearly(tmp_path, embedded_shards):
    cfg = load_config(DEMO, [
        f"train.out_dir={tmp_path}", f"data.sources=[{{path: {embedded_shards}}}]",
        "logging.wandb=disabled", "logging.progress_bar=false", "eval.every=0", "train.checkpoint_every=0",
        # the demo's model at 400 steps (the demo itself trains 3,300: tests/tools/test_demo.py)
        "train.max_steps=400", "train.warmup_steps=20", "train.decay_steps=80", "train.final_lr=3e-4",
    ])
    history = Trainer(cfg).fit()
    assert len(history) == cfg.train.max_steps
    losses = [r["loss"] for r in history]
    early = sum(losses[20:70]) / 50  # after the first fast drop to about the unigram entropy
    last = sum(losses[-50:]) / 50
    # from ln(vocab) ~ 8.3 at step 1: a clear fall, and still falling after the first drop
    assert last < losses[0] - 1.5, (losses[0], last)
    assert last < early - 0.3, (early, last)


def test_wandb_offline_is_the_default_and_writes_a_local_run(tmp_path, embedded_shards):
    cfg = load_config(DEMO, ["train.max_steps=1"], check_paths=False)
    assert cfg.logging.wandb == "offline"
    trainer = small_run(tmp_path, embedded_shards, "train.max_steps=1", "logging.wandb=offline")
    trainer.fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.iterdir())


def test_async_save_writes_the_same_checkpoints(tmp_path, embedded_shards):
    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / f"async_{mode}"
        small_run(out, embedded_shards, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=5",
                  f"train.async_save={mode}").fit()
        runs[mode] = out
    names = [p.name for p in list_checkpoints(runs["false"])]
    assert names == [p.name for p in list_checkpoints(runs["true"])] == ["step_00000001", "step_00000002", "step_00000003"]
    for name in names:
        a = _all_tensors(runs["false"] / "checkpoints" / name)
        b = _all_tensors(runs["true"] / "checkpoints" / name)
        assert set(a) == set(b) and any(k.startswith("optim/") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # each snapshot is of its own step


def _all_tensors(ckpt) -> dict:
    """Every stored tensor of a checkpoint, full (model/..., optim/...)."""
    from train.checkpoint import load_state, stored_tensors

    found = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in stored_tensors(ckpt, "").items()}
    load_state(ckpt, {k: whole(v) if v.ndim else v for k, v in found.items()}, distributed=False)
    return found
