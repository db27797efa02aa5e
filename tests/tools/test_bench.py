"""Each performance bench runs at tiny size on CPU and prints its figures (no speed thresholds).

The benches run in this process through ``tools.bench.main`` (a subprocess per bench cost ~4 s of
CPU for the interpreter and torch import alone); ``python -m tools.bench`` itself is run by
``test_checkpoint_bench_bad_ranks_is_one_error_line``.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from model.config import ModelConfig
from tests.conftest import run_module
from tools.bench import main as bench_main

NUM = r"([0-9.]+(?:e[+-]?\d+)?)"


def run_bench(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m tools.bench ARGS``, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = bench_main(list(args))
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def bench(*args: str) -> str:
    rc, out, err = run_bench(*args)
    assert rc == 0, f"tools.bench {' '.join(args)} failed ({rc}):\n{out[-3000:]}\n{err[-3000:]}"
    return out


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m.group(1))


def test_layer_bench_prints_rates_and_ratios():
    out = bench("layer", "--repeats", "2", "--warmup", "1", "--square", "128")
    assert "device CPU" in out and "bidirectional" in out
    layer = number(rf"layer fwd\+bwd: [0-9.e+-]+ ms, {NUM} TFLOP/s", out)
    gemm = number(rf"GEMM at layer shapes .*?, {NUM} TFLOP/s", out)
    ratio = number(rf"ratio layer/GEMM: {NUM}", out)
    assert layer > 0 and gemm > 0 and ratio == pytest.approx(layer / gemm, rel=0.02)
    assert number(rf"ratio layer/ceiling: {NUM}", out) > 0
    assert number(rf"square GEMM 128\^3 fp32: {NUM} TFLOP/s", out) > 0
    assert "layer MFU: n/a" in out


def test_layer_flops_agree_with_the_model_formula():
    from tools.benchmarks.layer import TINY, block_config, layer_flops

    cfg = block_config(TINY)
    s = TINY["seq"]
    per_token_head = 6.0 * cfg.embedding_size * cfg.d_model  # flops_per_token counts the LM head
    assert layer_flops(cfg, 2, s) == pytest.approx(2 * s * (cfg.flops_per_token(s) - per_token_head))
    assert isinstance(cfg, ModelConfig)


def test_step_bench_prints_throughput_and_memory():
    out = bench("step", "--steps", "2", "--warmup", "1", "--layers", "2", "--d-model", "64", "--ffn", "128",
                "--vocab", "256", "--seq", "32")
    assert "LocalEngine" in out and "2 layers d=64" in out
    assert number(rf"tokens/s: {NUM}", out) > 0
    assert number(rf"model TFLOP/s: {NUM}", out) > 0
    assert number(rf"peak memory: {NUM} GB", out) > 0
    assert "MFU: n/a" in out
    assert number(r"loss ([0-9.]+)\)", out) > 0


def test_attention_bench_lists_sdpa_and_the_unavailable_kernels():
    out = bench("attention", "--repeats", "2", "--warmup", "1", "--seq", "64")
    assert re.search(rf"^sdpa\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}$", out, re.M), out
    for name in ("fa2", "fa3", "fa4", "sdpa_cudnn", "sdpa_efficient"):
        assert f"unavailable: {name}: needs a CUDA device" in out
    assert re.search(r"fastest fwd\+bwd: sdpa", out)


def test_overhead_bench_prints_the_ratio():
    out = bench("overhead", "--rounds", "3", "--warmup", "1", "--layers", "2", "--d-model", "64", "--ffn", "128",
                "--vocab", "256", "--seq", "32", "--batch", "4", "--micro-batch", "2")
    d = number(rf"difftron step .*median {NUM} ms", out)
    p = number(rf"plain PyTorch loop: median {NUM} ms", out)
    ratio = number(rf"overhead ratio: {NUM}", out)
    assert d > 0 and p > 0 and ratio == pytest.approx(d / p, rel=0.01)
    assert "target <= 1.10" in out


@pytest.mark.parametrize("args", [
    ["layer", "--device", "cuda"], ["step", "--attention", "sdpa_cudnn"], ["attention", "--kernels", "nope"],
    ["overhead", "--batch", "3"],
])
def test_bad_arguments_fail_with_one_error_line(args):
    import torch

    if args[-1] in ("cuda", "sdpa_cudnn") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = run_bench(*args)
    assert rc != 0
    assert err.strip().splitlines()[-1].startswith("error: "), err


@pytest.mark.slow
def test_checkpoint_bench_prints_rates_and_the_8b_projection():
    out = bench("checkpoint", "--ranks", "1,2", "--d-model", "64", "--n-layers", "1", "--mlp-hidden-size", "128",
                "--vocab-size", "256")
    for n in (1, 2):
        for op in ("save", "async_blocking", "async_total", "load"):
            assert re.search(rf"^\s+{n}\s+{op}\s+{NUM}\s+{NUM}\s+{NUM}$", out, re.M), out
    assert number(rf"save {NUM} s", out) > 0 and number(rf"resume {NUM} s", out) > 0


def test_checkpoint_bench_bad_ranks_is_one_error_line():
    proc = run_module(["-m", "tools.bench", "checkpoint", "--ranks", "0"], check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --ranks"), proc.stderr
