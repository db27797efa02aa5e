"""``python -m tools.bench comm``: the collective counter against the layouts' formulas, and the
recommended data-parallel path's gradient reductions during the backward pass."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tools.benchmarks import comm
from tools.plan_comm import dp_minimum, pp_bytes, ring, tp_difftron
from tools.benchmarks.collectives import COLLECTIVES, CollectiveCounter, sent_bytes

CASES = ["tp1_pp1_dp2_z0", "tp1_pp1_dp2_z1_bf16", "tp1_pp1_dp2_z1_bf16_before", "tp2_pp1_dp1_z0", "tp1_pp2_dp1_z0"]
SCALARS = 256  # grad-norm / overflow scalars DeepSpeed all-reduces over DP: a few bytes


@pytest.fixture(scope="module")
def results():
    return comm.launch(CASES, timeout=900)


def _dp(per_rank, op=None):
    return [sum(c["sent"] for o, c in r["totals"].get("DP", {}).items() if op is None or o == op) for r in per_rank]


def test_no_collective_escapes_the_wrappers(results):
    for case in CASES:
        for r in results[case]:
            assert "error" not in r, r.get("trace", r)
            assert r["unwrapped"] == [], f"{case}: c10d ops outside the wrappers: {r['unwrapped'][:5]}"


def test_zero0_fp32_bytes_match_the_all_reduce_formula(results):
    """DP2, ZeRO-0, fp32: one all-reduce of the fp32 gradients per step, 2·4·Ψ·(dp-1)/dp."""
    for r in results["tp1_pp1_dp2_z0"]:
        want = dp_minimum(r["psi"], 2, 0, 4, 4, r["micro_batches"])["grad"]
        assert want == 2 * 4 * r["psi"] * ring(2)
        got = _dp([r])[0]
        assert want <= got <= want + SCALARS, (got, want)
        assert set(r["totals"]["DP"]) == {"all_reduce"}


def test_zero1_bf16_bytes_match_reduce_scatter_plus_all_gather(results):
    """DP2, ZeRO-1, bf16 (the recommended path): gradients reduced to their owners once per step
    (bf16, Ψ·2·(dp-1)/dp) plus the bf16 weights all-gathered (as much): within 1 % of the formula
    (DeepSpeed pads partitions), and no all-reduce of gradients."""
    for r in results["tp1_pp1_dp2_z1_bf16"]:
        mins = dp_minimum(r["psi"], 2, 1, 2, 2, r["micro_batches"])
        grads = _dp([r], "reduce")[0] + _dp([r], "reduce_scatter_tensor")[0]
        params = _dp([r], "all_gather_into_tensor")[0]
        assert mins["grad"] <= grads <= 1.01 * mins["grad"], (grads, mins)
        assert mins["param"] <= params <= 1.01 * mins["param"], (params, mins)
        assert _dp([r], "all_reduce")[0] <= SCALARS
        assert _dp([r])[0] <= 1.25 * (mins["grad"] + mins["param"])


def test_previous_bf16_zero1_config_all_reduces(results):
    """The configuration before issue 16 (BF16_Optimizer): the gradients are all-reduced after the
    backward pass, 1.5x the minimum at dp 2 (the counter sees the difference)."""
    for r in results["tp1_pp1_dp2_z1_bf16_before"]:
        assert r["optimizer"] == "BF16_Optimizer"
        mins = dp_minimum(r["psi"], 2, 1, 2, 2, r["micro_batches"])
        assert _dp([r], "all_reduce")[0] >= 2 * mins["grad"]
        assert _dp([r])[0] >= 1.45 * (mins["grad"] + mins["param"])
        assert r["timing"]["during_backward"] == 0


def test_recommended_path_reduces_during_backward(results):
    """The first gradient bucket goes out while most gradients are still to be computed; only the
    last micro-batch's backward reduces (ZeRO-1 accumulates the others locally)."""
    for r in results["tp1_pp1_dp2_z1_bf16"]:
        t = r["timing"]
        assert r["optimizer"] == "DeepSpeedZeroOptimizer"
        assert t["during_backward"] >= 2, t
        assert t["first_ready"] < 0.5, t
        assert t["bytes_during"] > t["bytes_after"], t
        # micro-batches before the last one send no gradient bytes
        by_step = {int(k): v for k, v in r["grad_bytes_by_micro_step"].items()}
        assert all(v == 0 for k, v in by_step.items() if k < t["micro_steps"] - 1), by_step


def test_tp2_bytes_match_the_implementation_formula(results):
    """TP2 without sequence parallelism (fp32): difftron's per-block all-reduces plus the
    vocab-parallel cross entropy's, for every micro-batch."""
    for r in results["tp2_pp1_dp1_z0"]:
        tp = sum(c["sent"] for c in r["totals"]["TP"].values())
        want = tp_difftron(r["tokens"], r["d_model"], r["stage_layers"], 2, 4, r["micro_batches"], r["masked"] / r["micro_batches"])
        assert abs(tp - want) <= 0.01 * want + SCALARS, (tp, want)


def test_pp2_sends_match_the_activation_formula(results):
    """PP2: each stage sends every micro-batch's activations (stage 0) or their gradients
    (stage 1), s·b·h fp32 each, to its pipeline peer."""
    for r in results["tp1_pp2_dp1_z0"]:
        sends = r["totals"]["PP"]["send"]["sent"]
        assert sends == pp_bytes(r["tokens"], r["d_model"], 4, r["micro_batches"], 2), r["totals"]["PP"]


def test_sent_bytes_ring_accounting():
    assert sent_bytes("all_reduce", 100, 4) == 150
    assert sent_bytes("ring", 100, 4) == 75
    assert sent_bytes("send", 100, 2) == 100
    assert sent_bytes("recv", 100, 2) == 0
    assert sent_bytes("all_reduce", 100, 1) == 0
    assert {"all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce_coalesced", "reduce"} <= set(COLLECTIVES)


def test_counter_restores_torch_distributed():
    before = {name: getattr(dist, name) for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor")}
    with CollectiveCounter(group_names={}):
        assert getattr(dist.all_reduce, "_collective_counter", False)
    assert {name: getattr(dist, name) for name in before} == before


def test_dp_minimum_formulas():
    assert dp_minimum(100, 4, 0, 2, 2, 3) == {"grad": 300.0, "param": 0.0}
    assert dp_minimum(100, 4, 1, 2, 2, 3) == {"grad": 150.0, "param": 150.0}
    assert dp_minimum(100, 4, 2, 2, 2, 3) == {"grad": 450.0, "param": 150.0}
    assert dp_minimum(100, 4, 3, 2, 2, 3) == {"grad": 450.0, "param": 900.0}
    assert dp_minimum(100, 1, 1, 2, 2, 3) == {"grad": 0.0, "param": 0.0}


def test_deepspeed_config_overlaps_and_reduce_scatters():
    from train.layout import ParallelConfig, ParallelLayout
    from train.parallelize import MAX_BUCKET_ELEMENTS, bucket_elements, deepspeed_config

    tiny = comm.tiny_config()
    dp = ParallelLayout.from_config(ParallelConfig(zero_stage=1), 4, tiny, 2, 16)
    z = deepspeed_config(dp, 1.0, "bf16", 8_000)["zero_optimization"]
    assert z["overlap_comm"] and z["reduce_scatter"] and not z["use_multi_rank_bucket_allreduce"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 1000
    assert deepspeed_config(dp, 1.0, "bf16")["data_types"] == {"grad_accum_dtype": "fp32"}
    pipe = ParallelLayout.from_config(ParallelConfig(pp=2, zero_stage=1), 4, tiny, 2, 16)
    assert "overlap_comm" not in deepspeed_config(pipe, 1.0, "bf16")["zero_optimization"]
    assert deepspeed_config(dp, 1.0, "bf16", overlap=False)["zero_optimization"] == {"stage": 1}
    assert bucket_elements(8_000_000_000) == MAX_BUCKET_ELEMENTS and bucket_elements(80_000) == 10_000
