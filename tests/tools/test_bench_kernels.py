"""tools/benchmarks/kernels.py, exercised on CPU: attention kernel lookup, checking, choice, timing."""

from __future__ import annotations

import pytest
import torch

from model.attention import BACKENDS
from model.llada import build_model
from tests.conftest import tiny_model_config
from tools.benchmarks.kernels import (
    AttentionChoice,
    apply_attention,
    attention_flops,
    attention_kernels,
    check_kernel,
    pick_attention,
    sdpa_context,
    time_interleaved,
)

SHAPE = (1, 2, 32, 16)


def test_cpu_has_sdpa_only_and_says_why_not_the_rest():
    available, unavailable = attention_kernels("cpu")
    assert {"sdpa", "sdpa_math"} <= set(available) <= {"sdpa", "sdpa_math", "sdpa_flash"}
    for name in ("fa2", "fa3", "fa4", "sdpa_cudnn", "sdpa_efficient"):
        assert "CUDA" in unavailable[name]
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for fn in available.values():
        assert torch.allclose(fn(q, k, v), ref, atol=1e-5)


def test_pick_falls_back_to_sdpa_on_cpu_and_rejects_unknown_names():
    choice = pick_attention("cpu", SHAPE, dtype=torch.float32)
    assert choice.name == "sdpa" and choice.model_backend == "sdpa" and choice.seconds == {}
    assert "fa3" in choice.unavailable
    with pytest.raises(ValueError, match="unknown attention kernel"):
        pick_attention("cpu", SHAPE, candidates=("fa9",))


def test_check_kernel_catches_a_wrong_kernel():
    sdpa = attention_kernels("cpu")[0]["sdpa"]
    assert check_kernel(sdpa, SHAPE, device="cpu", dtype=torch.float32) < 1e-4
    with pytest.raises(RuntimeError, match="differs from SDPA"):
        check_kernel(lambda q, k, v: q, SHAPE, device="cpu", dtype=torch.float32)


def test_sdpa_context_pins_a_backend_and_is_a_no_op_otherwise():
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with sdpa_context("sdpa_math"):
        assert torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, k, v), ref, atol=1e-5)
    with sdpa_context("sdpa_cudnn"):  # cuDNN has no CPU kernel: with only it allowed, nothing may run
        with pytest.raises(RuntimeError):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with sdpa_context("fa2"):  # not an SDPA backend: no restriction
        torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_apply_attention_sets_the_model_backend():
    model = build_model(tiny_model_config(), seed=0)
    choice = apply_attention(model, "sdpa_cudnn")
    assert isinstance(choice, AttentionChoice)
    assert {b.attention_backend for b in model.transformer.blocks} == {"sdpa"}
    apply_attention(model, "fa2")
    assert {b.attention_backend for b in model.transformer.blocks} == {"flash"}
    if "fa3" not in BACKENDS:
        with pytest.raises(ValueError, match="model.attention backend 'fa3'"):
            apply_attention(model, "fa3")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        apply_attention(model, "nope")


def test_attention_flops_match_the_model_count():
    cfg = tiny_model_config(n_layers=1)
    s = 32
    f = attention_flops(1, cfg.n_heads, s, cfg.head_dim)
    assert f["fwd"] == 4 * s * s * cfg.d_model
    # ModelConfig's attention term 12·L·d·s per token, times s tokens
    assert f["fwd_bwd_model"] == 12 * cfg.d_model * s * s
    assert f["fwd_bwd_fa"] == pytest.approx(3.5 * f["fwd"])


def test_time_interleaved_gives_one_positive_median_per_function():
    calls = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", warmup=1, repeats=3)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating order
