"""tools.plan: the memory and layout arithmetic against hand-computed numbers (performance.md 5)."""

from pathlib import Path

import pytest

from model.config import ModelConfig
from tests.conftest import run_module
from tools.plan import (
    GB,
    GIB,
    activation_bytes_per_layer,
    block_activation_bytes,
    enumerate_layouts,
    layout_memory,
    logits_bytes,
    model_state_bytes,
    pipeline_bubble,
    stage_params,
    tp_candidates,
)
from tools.plan import main as plan_main

REPO = Path(__file__).resolve().parents[2]
PSI = 8_015_581_184  # LLaDA-8B


def total(states: dict) -> float:
    return sum(states.values())


def test_model_states_follow_deepspeeds_paths():
    # bf16 ZeRO-1 = DeepSpeedZeroOptimizer with fp32 gradient accumulation, at its peak:
    # 2 (bf16 weights) + 5 (fp32 grad_accum + bf16 gradients) + 12/dp (fp32 masters, AdamW moments)
    s = model_state_bytes(PSI, 1, 8)
    assert s == {"weights": 2 * PSI, "gradients": 5 * PSI, "optimizer": 12 * PSI / 8}
    assert total(model_state_bytes(PSI, 0, 8)) == 20 * PSI  # no sharding: fp32 masters and grads too
    assert total(model_state_bytes(PSI, 2, 2)) == (2 + 18 / 2) * PSI
    assert total(model_state_bytes(PSI, 3, 4)) == 20 * PSI / 4
    assert total(model_state_bytes(PSI, 1, 2, precision="fp32")) == (4 + 20 / 2) * PSI


def test_bad_zero_stage():
    with pytest.raises(ValueError, match="zero_stage"):
        model_state_bytes(PSI, 4, 8)
    with pytest.raises(ValueError, match="zero_stage"):
        model_state_bytes(PSI, 1, 8, precision="fp16")


def test_stage_params_split():
    cfg = ModelConfig()
    assert stage_params(cfg, 1, 1, 0) == PSI
    # TP=2: all linear weights and both vocab tables halve; the 65 norm vectors stay whole
    norms = 2 * 4096 * 32 + 4096
    assert stage_params(cfg, 2, 1, 0) == (PSI - norms) / 2 + norms
    # PP=2: first stage = 16 blocks + embedding; last = 16 blocks + final norm + head
    block = cfg.params_per_layer()
    emb = 126464 * 4096
    assert stage_params(cfg, 1, 2, 0) == 16 * block + emb
    assert stage_params(cfg, 1, 2, 1) == 16 * block + emb + 4096
    assert stage_params(cfg, 1, 2, 0) + stage_params(cfg, 1, 2, 1) == PSI


def test_activation_arithmetic():
    cfg = ModelConfig()
    sbh = 4096 * 4096  # s=4096, b=1, h=4096: 1 sbh = 16.8 MB
    none = block_activation_bytes(cfg, 4096, 1, 1, "none")
    assert none / sbh == pytest.approx(34.28, abs=0.01)  # 2(6h + 2kv + 3f)/h + lse + RoPE tables
    assert block_activation_bytes(cfg, 4096, 1, 1, "selective") / sbh == pytest.approx(22.25, abs=0.01)
    assert block_activation_bytes(cfg, 4096, 1, 1, "full") == 2 * sbh
    assert block_activation_bytes(cfg, 4096, 1, 2, "full") == sbh  # sequence parallel
    assert 32 * none / GB == pytest.approx(18.40, abs=0.01)
    assert activation_bytes_per_layer(4096, 1, 4096, 1, recompute=False) == none
    # head + loss: 4096 × 126464 × 10 bytes = 5.18 GB per sequence, halved by TP=2
    assert logits_bytes(4096, 1, 126464, 1) == 4096 * 126464 * 10
    assert logits_bytes(4096, 1, 126464, 2) == 4096 * 126464 * 5


def test_pipeline_bubble():
    assert pipeline_bubble(1, 10) == 0
    assert pipeline_bubble(4, 12) == 0.25


def test_layout_memory_by_part_hand_numbers():
    cfg = ModelConfig()
    parts, tot = layout_memory(cfg, tp=1, pp=1, dp=8, zero_stage=1, seq_len=4096, micro_batch=1,
                               grad_accum=160, checkpointing="none", reserve_bytes=4 * GB)
    assert parts["weights"] == 2 * PSI and parts["gradients"] == 5 * PSI
    assert parts["optimizer"] == 12 * PSI / 8
    assert parts["activations"] == 32 * block_activation_bytes(cfg, 4096, 1, 1, "none")
    assert parts["logits"] == 4096 * 126464 * 10
    assert parts["buffers"] == 4 * GB
    assert tot == sum(parts.values())
    assert tot / GB == pytest.approx(95.7, abs=0.05)  # 68.1 states + 18.4 + 5.2 + 4.0: does not fit 80 GB


def test_pipeline_first_stage_holds_p_microbatches():
    cfg = ModelConfig()
    parts, _ = layout_memory(cfg, tp=1, pp=4, dp=2, zero_stage=1, seq_len=4096, micro_batch=1,
                             grad_accum=640, checkpointing="none", reserve_bytes=0)
    # most loaded stage is the first: 4 micro-batches in flight × 8 layers = 32 layers' worth
    assert parts["activations"] == 4 * 8 * block_activation_bytes(cfg, 4096, 1, 1, "none")
    assert parts["logits"] == 0


def test_tp_candidates_respect_heads_vocab_and_node():
    cfg = ModelConfig()
    assert tp_candidates(cfg, 64, 8) == [1, 2, 4, 8]
    assert tp_candidates(cfg, 6, 8) == [1, 2]  # 3 and 6 do not divide 32 heads
    assert tp_candidates(cfg, 64, 4) == [1, 2, 4]  # TP stays inside a node
    gqa = ModelConfig(n_kv_heads=2)
    assert tp_candidates(gqa, 8, 8) == [1, 2]


def test_layouts_rules_and_ranking():
    cfg = ModelConfig()
    layouts = enumerate_layouts(cfg, gpus=8, seq_len=4096, global_batch=1280, capacity_bytes=80 * GIB)
    assert layouts
    for lay in layouts:
        assert lay.tp * lay.pp * lay.dp == 8
        assert cfg.n_layers % lay.pp == 0 and cfg.n_heads % lay.tp == 0
        assert not (lay.pp > 1 and lay.zero_stage > 1)  # DeepSpeed pipeline: ZeRO 0/1 only
        assert 1280 % (lay.micro_batch * lay.dp) == 0
        assert lay.total <= 80 * GIB
    best = layouts[0]  # TP1 ZeRO-1 needs 87.7 GB; TP2 + SP halves activations and the head
    assert (best.tp, best.pp, best.dp, best.zero_stage, best.checkpointing) == (2, 1, 4, 1, "none")
    # 512 GPUs: DP=512 does not divide the global batch 1280 -> the best layout uses TP=2 (DP=256)
    big = enumerate_layouts(cfg, gpus=512, seq_len=4096, global_batch=1280, capacity_bytes=80 * GIB)
    assert big and all(lay.dp != 512 for lay in big)
    assert (big[0].tp, big[0].dp) == (2, 256)


def test_nothing_fits_on_one_gpu():
    assert enumerate_layouts(ModelConfig(), gpus=1, seq_len=4096, global_batch=1280, capacity_bytes=80 * GIB) == []


def test_cli_8b_parameters_and_flops():
    out = run_module(["-m", "tools.plan", str(REPO / "configs/model/llada_8b.yaml")]).stdout
    assert "8,015,581,184" in out
    assert "6,979,588,096" in out and "7,497,318,400" in out
    assert "51.43 GFLOP/token" in out


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m tools.plan ARGS`` in this process (test_cli_8b_parameters_and_flops runs the real CLI)."""
    rc = plan_main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_layouts_and_none_fits(capsys):
    rc, out, _ = plan_cli(capsys, REPO / "configs/model/llada_8b.yaml", "--gpus", "8")
    # ranked by predicted step time (tools/plan_comm.py): TP1 PP2 hides its little traffic best
    assert rc == 0 and "layouts that fit" in out and "parallel.tp=1 parallel.pp=2 parallel.zero_stage=1" in out
    assert "8.50" in out  # bytes/param of bf16 ZeRO-1 at dp 8 (7 + 12/8)
    rc, out, _ = plan_cli(capsys, REPO / "configs/model/llada_8b.yaml", "--gpus", "1")
    assert rc == 0 and "no layout fits" in out


def test_cli_run_config_and_errors(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {REPO / 'configs/model/llada_8b.yaml'}\ntrain:\n  seq_len: 2048\n  global_batch_size: 64\n"
                   "  micro_batch_size: 1\ndata:\n  sources:\n    - path: /nonexistent/placeholder\n")
    rc, out, _ = plan_cli(capsys, run, "--gpus", "8")
    assert rc == 0 and "seq_len 2048" in out and "global batch 64 sequences" in out
    rc, _, err = plan_cli(capsys, tmp_path / "missing.yaml")
    assert rc != 0 and err.strip().startswith("error:") and "missing.yaml" in err
    rc, _, err = plan_cli(capsys, REPO / "configs/model/llada_8b.yaml", "--gpus", "0")
    assert rc != 0 and "--gpus must be positive" in err
