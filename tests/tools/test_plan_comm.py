"""tools.plan_comm: the interconnect model and the communication-aware layout ranking."""

from __future__ import annotations

from model.config import ModelConfig
from tools import plan
from tools.plan_comm import Interconnect, pp_bytes, predict_step, rank_by_step_time, tp_difftron, tp_minimum

LLADA_8B = "configs/model/llada_8b.yaml"


def _cfg() -> ModelConfig:
    return plan.read_plan_input(LLADA_8B).model


def _layouts(cfg, gpus):
    return plan.enumerate_layouts(cfg, gpus=gpus, seq_len=4096, global_batch=1280, capacity_bytes=80 * plan.GIB)


def test_overlapped_reduce_scatter_beats_the_previous_all_reduce():
    cfg = _cfg()
    kw = dict(tp=1, pp=1, dp=64, zero_stage=1, micro_batch=1, grad_accum=20, seq_len=4096, recompute=False, overhead=0.0)
    new, old = predict_step(cfg, **kw), predict_step(cfg, overlapped_dp=False, **kw)
    assert new.compute_s == old.compute_s
    assert old.dp_bytes == 1.25 * new.dp_bytes  # (1.5·2 + 2) vs (2 + 2) bytes per parameter
    assert new.step_s < old.step_s and new.mfu > old.mfu


def test_slower_interconnect_costs_time_and_changes_the_ranking():
    cfg = _cfg()
    layouts = _layouts(cfg, 64)
    fast = rank_by_step_time(cfg, list(layouts), Interconnect(ib_gbps=45.0))
    slow = rank_by_step_time(cfg, list(layouts), Interconnect(ib_gbps=0.5))
    best_fast, best_slow = fast[0], slow[0]
    assert best_fast.prediction.dp_bytes > best_slow.prediction.dp_bytes  # less cross-node traffic wins
    assert (best_fast.tp, best_fast.pp) != (best_slow.tp, best_slow.pp)


def test_tp_formulas():
    # difftron's layers: 7 all-reduces per block vs Megatron's 4 (fused QKV and gate/up)
    assert tp_difftron(100, 10, 4, 2, 2, 1) / tp_minimum(100, 10, 4, 2, 2, 1) == 30 / 18
    assert tp_minimum(100, 10, 4, 1, 2, 3) == 0
    assert pp_bytes(100, 10, 2, 3, 2) == 6000 and pp_bytes(100, 10, 2, 3, 4) == 12000 and pp_bytes(100, 10, 2, 3, 1) == 0


def test_plan_cli_prints_predicted_step_time(capsys):
    assert plan.main([LLADA_8B, "--gpus", "64", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "predicted step time on 64 H100s" in out and "MFU" in out
