"""One non-causal attention function with a choice of backends.

``attention(q, k, v, key_padding_mask)`` computes bidirectional softmax attention. Backends:

- ``"flash"``: FlashAttention (``flash_attn.flash_attn_func`` with ``causal=False``), used only on
  CUDA tensors in fp16/bf16 and without a padding mask; imported lazily, never at module import;
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (any device, any dtype, masks,
  GQA);
- ``"auto"`` (default): flash when it is installed and applicable, otherwise SDPA.

Shapes: q ``[B, H, S, D]``, k and v ``[B, Hkv, S, D]`` with ``H % Hkv == 0``; the mask is
``[B, S]`` with True (or 1) for tokens that may be attended to. Returns ``[B, H, S, D]``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash")


@functools.cache
def flash_attn_func():
    """The flash-attn kernel, or None when flash-attn is not installed (e.g. on CPU machines)."""
    try:
        from flash_attn import flash_attn_func as fn  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a build that does not match the installed torch/CUDA
        return None
    return fn


def flash_applicable(q: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
    return (
        key_padding_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and flash_attn_func() is not None
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash" and not flash_applicable(q, key_padding_mask):
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn installed, CUDA fp16/bf16 tensors and no "
            "padding mask; use 'auto' to fall back to SDPA"
        )
    if backend != "sdpa" and flash_applicable(q, key_padding_mask):
        # flash-attn takes [B, S, H, D] and handles GQA itself.
        out = flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return out.transpose(1, 2)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.bool)[:, None, None, :]
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=gqa)
