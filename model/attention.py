"""One non-causal attention function with a choice of backends.

``attention(q, k, v, key_padding_mask, backend)`` computes bidirectional softmax attention.

- ``"auto"`` (default): FlashAttention 2 when installed and applicable, otherwise SDPA;
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, letting PyTorch pick its kernel
  (any device, any dtype, padding masks, GQA);
- ``"sdpa_cudnn"``, ``"sdpa_flash"``, ``"sdpa_efficient"``: SDPA pinned to one of its CUDA
  kernels (cuDNN, flash, memory-efficient);
- ``"flash"`` (flash-attn 2, ``flash_attn.flash_attn_func``), ``"fa3"`` (FlashAttention-3,
  ``flash_attn_interface``), ``"fa4"`` (FlashAttention-4, CuTe DSL, ``flash_attn.cute``): external
  kernels called with ``causal=False``; they need CUDA fp16/bf16 tensors and no padding mask, and
  are imported lazily (never at module import, so this module imports on any CPU machine).

``tools.benchmarks.kernels.pick_attention`` measures them side by side on a GPU and picks one per device.

Shapes: q ``[B, H, S, D]``, k and v ``[B, Hkv, S, D]`` with ``H % Hkv == 0``; the mask is
``[B, S]`` with True (or 1) for tokens that may be attended to. Returns ``[B, H, S, D]``.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

EXTERNAL = {  # backend -> (module, function)
    "flash": ("flash_attn", "flash_attn_func"),
    "fa3": ("flash_attn_interface", "flash_attn_func"),
    "fa4": ("flash_attn.cute", "flash_attn_func"),
}
SDPA_PINNED = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")
BACKENDS = ("auto", "sdpa", *SDPA_PINNED, *EXTERNAL)


@functools.cache
def external_kernel(backend: str = "flash"):
    """The external kernel of ``backend``, or None when it is not installed (e.g. on CPU)."""
    module, name = EXTERNAL[backend]
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # ImportError, or a build that does not match the installed torch/CUDA
        return None


def flash_attn_func():
    """flash-attn 2's kernel, or None when flash-attn is not installed."""
    return external_kernel("flash")


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return " " + version(distribution)
    except PackageNotFoundError:
        return ""


def _kernel_line(backend: str) -> str:
    module, name = EXTERNAL[backend]
    dist = {"flash": "flash-attn", "fa3": "flash-attn-3", "fa4": "flash-attn-cute"}[backend]
    return f"{backend} ({module}.{name}{_version(dist)})"


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel that ``attention(q, k, v, None, backend)`` runs for ``device``/``dtype`` tensors,
    as one line for the run log (what ``"auto"`` resolves to included). Raises ``ValueError``
    (one line) when an explicitly chosen external kernel cannot run there: not installed, a
    build that does not import, CPU tensors or fp32, so a run fails at start, not at step 1."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device_type = torch.device(device).type
    usable = device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend in EXTERNAL:
        module = EXTERNAL[backend][0]
        if external_kernel(backend) is None:
            raise ValueError(
                f"attention backend {backend!r} needs {module}, which is not installed or does not import "
                "with this torch/CUDA; install it or use attention_backend=auto (SDPA)"
            )
        if not usable:
            raise ValueError(
                f"attention backend {backend!r} needs CUDA fp16/bf16 tensors, this run has {device_type} "
                f"{str(dtype).removeprefix('torch.')}; use attention_backend=auto or sdpa"
            )
        return _kernel_line(backend)
    if backend in SDPA_PINNED:
        if device_type != "cuda":
            raise ValueError(f"attention backend {backend!r} pins a CUDA kernel of SDPA; this run is on {device_type}")
        return f"{backend} (torch SDPA restricted to its {backend.removeprefix('sdpa_')} kernel)"
    if backend == "auto" and usable and flash_attn_func() is not None:
        return "auto -> " + _kernel_line("flash")
    if backend == "sdpa":
        return "sdpa (torch scaled_dot_product_attention picks its kernel)"
    how = "flash-attn not installed" if usable else f"{device_type} {str(dtype).removeprefix('torch.')}"
    return f"auto -> sdpa (torch scaled_dot_product_attention picks its kernel; {how})"


def external_applicable(q: torch.Tensor, key_padding_mask: torch.Tensor | None, backend: str = "flash") -> bool:
    return (
        key_padding_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and external_kernel(backend) is not None
    )


def flash_applicable(q: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
    return external_applicable(q, key_padding_mask, "flash")


def _sdpa(q, k, v, key_padding_mask):
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.bool)[:, None, None, :]
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=gqa)


def _sdpa_pinned(backend: str, q, k, v, key_padding_mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend]
    with sdpa_kernel([kernel]):
        return _sdpa(q, k, v, key_padding_mask)


def _external(backend: str, q, k, v):
    # the external kernels take [B, S, H, D] and handle GQA themselves
    out = external_kernel(backend)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    if isinstance(out, tuple):  # FA3/FA4 may return (out, softmax_lse)
        out = out[0]
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend in EXTERNAL:
        if not external_applicable(q, key_padding_mask, backend):
            module = EXTERNAL[backend][0]
            raise RuntimeError(
                f"attention backend {backend!r} needs {module} installed, CUDA fp16/bf16 tensors and no "
                "padding mask; use 'auto' to fall back to SDPA"
            )
        return _external(backend, q, k, v)
    if backend in SDPA_PINNED:
        return _sdpa_pinned(backend, q, k, v, key_padding_mask)
    if backend == "auto" and flash_applicable(q, key_padding_mask):
        return _external("flash", q, k, v)
    return _sdpa(q, k, v, key_padding_mask)
