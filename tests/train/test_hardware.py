"""MFU and the GPU peak table against hand-computed figures for LLaDA-8B at 4096 tokens on H100."""

import pytest

from model.config import ModelConfig
from train.hardware import mfu, peak_flops


def test_llada_8b_flops_per_token_at_4096():
    # by hand: 6·N_mm = 44.98 GFLOP, 12·L·d·s = 6.44 GFLOP, total 51.43 GFLOP/token
    cfg = ModelConfig()
    assert cfg.num_matmul_params() == 7_497_318_400
    assert cfg.flops_per_token(4096) == 6 * 7_497_318_400 + 12 * 32 * 4096 * 4096
    assert cfg.flops_per_token(4096) / 1e9 == pytest.approx(51.43, abs=0.005)


@pytest.mark.parametrize("tokens_per_gpu, expected", [(7_696, 0.40), (9_621, 0.50), (10_583, 0.55), (11_545, 0.60), (12_507, 0.65)])
def test_mfu_table_rows(tokens_per_gpu, expected):
    # MFU <-> throughput at the H100 SXM dense bf16 peak, 989.5 TFLOP/s
    fpt = ModelConfig().flops_per_token(4096)
    for gpus in (1, 8, 64):
        value = mfu(tokens_per_gpu * gpus, fpt, gpus, "NVIDIA H100 80GB HBM3")
        assert value == pytest.approx(expected, abs=0.001)


def test_mfu_is_a_plain_ratio():
    assert mfu(1000.0, 989.5e9, 1, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert mfu(1000.0, 312e9, 2, "NVIDIA A100-SXM4-80GB") == pytest.approx(0.5)


def test_mfu_none_off_gpu_or_unknown():
    assert mfu(1e4, 5e10, 1, None) is None
    assert mfu(1e4, 5e10, 1, "") is None
    assert mfu(1e4, 5e10, 1, "Tesla V100-SXM2-16GB") is None  # no BF16 tensor cores: not listed
    assert mfu(1e4, 5e10, 0, "NVIDIA H100 80GB HBM3") is None


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756.0e12),
    ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12),
    ("NVIDIA H800", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA L40", 181.05e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", None),
])
def test_peak_table_lookup(name, peak):
    assert peak_flops(name) == peak
