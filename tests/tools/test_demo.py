"""``python -m tools.demo`` at a few steps: every number it reports comes from its own run."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from data.loader import build_loader
from tests.conftest import REPO, run_module
from tools.demo import bucket_means, unigram_entropy
from train.config import load_config

STEPS = 12
EVAL_BATCHES = 2


def entropy(tokens) -> float:
    counts = Counter(tokens)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def miller_madow(tokens) -> float:
    counts = Counter(tokens)
    return entropy(tokens) + (len(counts) - 1) / (2 * sum(counts.values()))


def test_unigram_entropy_estimators_against_a_hand_computed_sample():
    # tokens 5 5 7 9: frequencies 1/2, 1/4, 1/4 (ids not seen count nothing)
    plug_in = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397...
    out = unigram_entropy([0, 0, 0, 0, 0, 2, 0, 1, 0, 1])  # bincount of 5 5 7 9 over ids 0..9
    assert out["types"] == 3 and out["tokens"] == 4
    assert out["plug_in"] == pytest.approx(plug_in, abs=1e-12)
    assert out["miller_madow"] == pytest.approx(plug_in + (3 - 1) / (2 * 4), abs=1e-12)  # + 0.25
    # one type: no uncertainty, both zero; the correction vanishes as N grows for fixed K
    assert unigram_entropy([4]) == {"plug_in": 0.0, "miller_madow": 0.0, "types": 1, "tokens": 4}
    big = unigram_entropy([1000, 1000])
    assert big["plug_in"] == pytest.approx(math.log(2)) and big["miller_madow"] - big["plug_in"] == pytest.approx(1 / 4000)


def split_tokens(cfg, split: str, batches: int) -> list[int]:
    t = cfg.train
    loader = build_loader(cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size, dp_rank=0, dp_size=1,
                          seed=t.seed, split=split)
    return [int(x) for k in range(batches) for x in loader.batch(k)["input_ids"].reshape(-1)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, embedded_shards):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = run_module([
        "-m", "tools.demo", "--run-dir", str(run_dir), "--data", str(embedded_shards), "--steps", str(STEPS),
        "--set", f"eval.batches={EVAL_BATCHES}", "--set", f"eval.every={STEPS // 2}", "--set", "logging.wandb=disabled",
        "--set", "logging.progress_bar=false",
    ], timeout=1800)
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"train.out_dir={run_dir}", f"data.sources=[{{path: {embedded_shards}}}]", f"train.max_steps={STEPS}",
        f"eval.batches={EVAL_BATCHES}", f"eval.every={STEPS // 2}", "logging.wandb=disabled", "logging.progress_bar=false",
    ])
    return run_dir, proc.stdout, summary, records, cfg


@pytest.mark.slow
def test_bounds_are_the_in_training_evaluations(demo):
    run_dir, stdout, summary, records, cfg = demo
    evals = {r["step"]: r["eval_bound"] for r in records if "eval_bound" in r}
    assert min(evals) == 0 and max(evals) == STEPS  # eval.at_start, and the last step
    assert summary["bound_start"] == {"step": 0, "value": evals[0]}
    assert summary["bound_end"] == {"step": STEPS, "value": evals[STEPS]}
    assert evals[0] > evals[STEPS]  # even 12 steps learn something
    assert f"step     0: {evals[0]:.3f}" in stdout and f"step    {STEPS}: {evals[STEPS]:.3f}" in stdout
    # the end bound is the final checkpoint's bound: evaluating it again gives the same number
    from dataclasses import replace

    from train.trainer import Trainer

    trainer = Trainer(replace(cfg, train=replace(cfg.train, resume=True)))
    assert trainer.step == STEPS
    assert trainer.evaluate() == pytest.approx(evals[STEPS], rel=1e-6)


@pytest.mark.slow
def test_unigram_references_are_computed_on_the_evaluated_validation_tokens(demo):
    _, stdout, summary, _, cfg = demo
    val = split_tokens(cfg, "validation", EVAL_BATCHES)
    assert summary["validation_tokens"] == len(val) == EVAL_BATCHES * cfg.train.global_batch_size * cfg.train.seq_len
    assert summary["unigram_entropy_plug_in"] == pytest.approx(entropy(val), abs=1e-9)
    assert summary["unigram_entropy"] == pytest.approx(miller_madow(val), abs=1e-9)
    assert summary["validation_types"] == len(set(val))
    # not the entropy of as many training tokens (the test tells the two apart)
    assert abs(entropy(split_tokens(cfg, "train", EVAL_BATCHES)) - entropy(val)) > 1e-3
    # the held-out reference: add-1/2 unigram counts of one epoch of the training split, scored on `val`
    t = cfg.train
    n_train = build_loader(cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size, dp_rank=0, dp_size=1,
                           seed=t.seed, split="train").num_samples()[0]
    counts = Counter(split_tokens(cfg, "train", n_train // t.global_batch_size))
    total, vocab = sum(counts.values()), cfg.model.vocab_size
    cross = -sum(math.log((counts[x] + 0.5) / (total + 0.5 * vocab)) for x in val) / len(val)
    assert summary["unigram_training_tokens"] == total
    assert summary["unigram_cross_entropy"] == pytest.approx(cross, rel=1e-9)
    assert summary["unigram_cross_entropy"] > summary["unigram_entropy"]  # the in-sample fit is the lower one
    assert f"scored on the same validation tokens: {cross:.3f}" in stdout
    assert (f"unigram entropy of the same validation tokens (Miller-Madow estimate: plug-in {entropy(val):.3f}"
            f" + (K-1)/2N with K = {len(set(val)):,} types): {miller_madow(val):.3f}") in stdout
    below = miller_madow(val) - summary["bound_end"]["value"]
    assert f"-> the bound is {abs(below):.2f} nats {'below' if below >= 0 else 'ABOVE'} it" in stdout


@pytest.mark.slow
def test_bucket_losses_plots_and_samples(demo):
    run_dir, stdout, summary, records, cfg = demo
    n = cfg.logging.t_buckets
    train = [r for r in records if "loss" in r]
    for key in ("bucket_loss_first", "bucket_loss_last"):
        lo, hi = summary[key]["steps"]
        expected = [r for r in train if lo <= r["step"] <= hi]
        assert expected, key
        for i in (0, n - 1):
            values = [r[f"loss_t{i}"] for r in expected if f"loss_t{i}" in r]
            assert summary[key][f"loss_t{i}"] == pytest.approx(sum(values) / len(values))
    assert summary["bucket_loss_last"]["steps"][1] == STEPS
    assert bucket_means(train, n, (1, STEPS)) != bucket_means(train, n, (STEPS, STEPS))
    assert f"least masked, t in [0, {1 / n:.2f})" in stdout and "most masked" in stdout
    assert sorted(p.rsplit("/", 1)[-1] for p in summary["plots"]) == ["loss.png", "loss_by_t.png", "throughput.png"]
    for path in summary["plots"]:
        assert (REPO / path).is_file() or (run_dir / "plots" / path.rsplit("/", 1)[-1]).is_file()
        assert path in stdout
    assert (run_dir / "hf" / "config.json").is_file()
    assert "=== def read_file(path):" in summary["samples"] and "    def read_file(path):" in stdout
    assert summary["timing"]["train_cpu_s"] > 0
