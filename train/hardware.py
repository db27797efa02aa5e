"""GPU peak throughput and model FLOPs utilization (MFU).

``MFU = tokens_per_s × model_FLOPs_per_token / (num_gpus × peak_FLOP_per_s)`` with the model's
bidirectional FLOPs per token (``ModelConfig.flops_per_token(seq_len)`` = ``6·N_mm + 12·L·d·s``,
no causal halving) and the GPU's peak dense BF16 tensor-core rate from :data:`PEAK_BF16_FLOPS`.
MFU is reported only on GPUs this table knows; on CPU or an unknown GPU it is ``None``.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

# Peak dense (no structured sparsity) BF16 tensor-core FLOP/s, from NVIDIA's datasheets (dense =
# half of the "with sparsity" figure). Matched against ``torch.cuda.get_device_name()`` lowercased:
# the first row whose substrings all occur wins, so specific variants come before the generic one.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gh200",), 989.5e12),
    (("h100", "pcie"), 756.0e12),
    (("h100", "nvl"), 835.5e12),
    (("h100",), 989.5e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("h200", "nvl"), 835.5e12),
    (("h200",), 989.5e12),  # SXM ("NVIDIA H200")
    (("h800", "pcie"), 756.0e12),
    (("h800",), 989.5e12),  # same Hopper die and BF16 rate as H100 SXM (NVLink cut)
    (("h20",), 148.0e12),
    (("b200",), 2250.0e12),
    (("a100",), 312.0e12),  # SXM4 and PCIe, 40 and 80 GB
    (("a800",), 312.0e12),
    (("l40s",), 362.05e12),
    (("l40",), 181.05e12),
    (("l4",), 121.0e12),
    (("a10",), 125.0e12),  # A10 (24 GB); A10G differs and is not listed
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense BF16 FLOP/s of one GPU named like ``torch.cuda.get_device_name()``, or None."""
    if not device_name:
        return None
    name = device_name.lower()
    if "a10g" in name:
        return None
    for needles, peak in PEAK_BF16_FLOPS:
        if all(n in name for n in needles):
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, num_gpus: int, device_name: str | None) -> float | None:
    """Model FLOPs utilization in [0, 1] (a fraction, not a percentage).

    ``tokens_per_s``: tokens trained per second summed over all ``num_gpus`` GPUs (the trainer's
    global ``tokens_per_s``); ``flops_per_token``: forward + backward model FLOPs per token at
    the step's sequence length. Returns None when ``device_name`` is None (not on a GPU) or not
    in the peak table.
    """
    peak = peak_flops(device_name)
    if peak is None or num_gpus <= 0:
        return None
    return tokens_per_s * flops_per_token / (num_gpus * peak)


def current_device_name() -> str | None:
    """The CUDA device name of this process, or None when not running on a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()
