"""train/metrics.py: metrics.jsonl is strict JSON (non-finite values as flagged nulls)."""

from __future__ import annotations

import json


def test_metrics_jsonl_is_strict_json_with_non_finite_values_as_flagged_nulls(tmp_path):
    from train.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), enabled=True, wandb_mode="disabled", project="p", run_name=None, config={})
    logger.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3, "spike_z": float("nan"),
                   "loss_t0": float("nan"), "loss_t1": 2.5}, console=False)
    logger.log(2, {"loss": 1.5, "grad_norm": 0.5, "lr": 1e-3, "spike_z": 0.1}, console=False)

    def refuse(name):
        raise AssertionError(f"{name} in metrics.jsonl is not JSON")

    records = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "spike_z": None, "loss_t0": None,
                          "loss_t1": 2.5, "nonfinite": ["loss", "grad_norm"]}  # NaN spike_z/bucket: not measured
    assert records[1] == {"step": 2, "loss": 1.5, "grad_norm": 0.5, "lr": 1e-3, "spike_z": 0.1}


def test_a_nan_step_is_kept_in_metrics_jsonl_as_null(embedded_shards, tmp_path):
    from tests.train.test_trainer_faults import _nan_at, small_run

    _nan_at(small_run(tmp_path, embedded_shards, "train.max_steps=3"), 2).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] is None and "loss" in records[1]["nonfinite"]
