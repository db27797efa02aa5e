"""Attention kernels for the benchmarks: which can run here, timing them, picking the fastest.

Everything here imports and runs on CPU; the GPU-only kernels (flash-attn 2/3/4, SDPA's cuDNN /
flash / memory-efficient backends) are looked up lazily and reported as unavailable with a reason
when they cannot run. Nothing touches CUDA at import time.

Attention kernels (all non-causal; q, k, v ``[B, H, S, D]`` -> ``[B, H, S, D]``):

- ``fa4``: FlashAttention 4 (CuTe DSL; ``flash_attn.cute.flash_attn_func``, package ``flash-attn-4``);
- ``fa3``: FlashAttention 3 (Hopper; ``flash_attn_interface.flash_attn_func``);
- ``fa2``: FlashAttention 2 (``flash_attn.flash_attn_func``, version 2.x);
- ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_math``: PyTorch SDPA pinned to one
  backend with ``torch.nn.attention.sdpa_kernel``;
- ``sdpa``: PyTorch SDPA with its own dispatch (always available; the CPU choice).

:func:`pick_attention` times the available kernels side by side on the device at the model's
shape and returns the fastest that matches SDPA's output; :func:`apply_attention` installs the
choice on an ``LLaDAModel`` through ``model.set_attention_backend`` (``fa2`` -> ``"flash"``,
``sdpa_*`` -> ``"sdpa"`` plus :meth:`AttentionChoice.context` around forward). ``fa3``/``fa4`` need
``model.attention`` to know those names; until it does,
:func:`apply_attention` raises a clear error for them and :func:`pick_attention` can exclude them
with ``for_model=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("fa4", "fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa")
SDPA_BACKENDS = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
# What model.attention.BACKENDS calls each kernel (None: model.attention has no name for it yet).
MODEL_BACKEND = {"fa2": "flash", "fa3": "fa3", "fa4": "fa4", "sdpa": "sdpa", **{k: "sdpa" for k in SDPA_BACKENDS}}

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----- kernel lookup ----------------------------------------------------------------------------
def _import_attr(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception as exc:  # ImportError, or a build that does not match torch/CUDA
        return None, f"{module} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"


def _bshd_kernel(fn) -> AttentionFn:
    """Wrap a flash-attn style kernel taking ``[B, S, H, D]`` into the ``[B, H, S, D]`` convention.
    Some versions return ``(out, lse)``; only ``out`` is kept."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        if isinstance(out, tuple):
            out = out[0]
        return out.transpose(1, 2)

    return run


def _sdpa_kernel(backend_name: str | None) -> AttentionFn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_context(backend_name):
            return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=k.shape[1] != q.shape[1])

    return run


def sdpa_context(kernel: str | None):
    """``sdpa_kernel([backend])`` for an ``sdpa_*`` kernel name; a null context otherwise."""
    if kernel not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kernel])])


def _runs_on_cpu(kernel: str) -> bool:
    q = torch.zeros(1, 1, 8, 8)
    try:
        _sdpa_kernel(kernel)(q, q, q)
        return True
    except RuntimeError:
        return False


def attention_kernels(device: torch.device | str) -> tuple[dict[str, AttentionFn], dict[str, str]]:
    """The kernels that may run on ``device`` and, for the others, why not.

    Returns ``(available, unavailable)``: name -> callable ``(q, k, v) -> out`` (``[B, H, S, D]``),
    and name -> one-line reason. On CPU: ``sdpa``, ``sdpa_math`` and (PyTorch's CPU flash kernel)
    ``sdpa_flash``.
    """
    device = torch.device(device)
    available: dict[str, AttentionFn] = {"sdpa": _sdpa_kernel(None), "sdpa_math": _sdpa_kernel("sdpa_math")}
    unavailable: dict[str, str] = {}
    cuda = device.type == "cuda" and torch.cuda.is_available()
    for name in ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient"):
        if cuda:
            available[name] = _sdpa_kernel(name)
        elif _runs_on_cpu(name):  # PyTorch has a CPU flash kernel; cuDNN and efficient are CUDA-only
            available[name] = _sdpa_kernel(name)
        else:
            unavailable[name] = "needs a CUDA device (no CPU kernel)"
    lookups = {
        "fa4": ("flash_attn.cute", "flash_attn_func"),
        "fa3": ("flash_attn_interface", "flash_attn_func"),
        "fa2": ("flash_attn", "flash_attn_func"),
    }
    for name, (module, attr) in lookups.items():
        if not cuda:
            unavailable[name] = "needs a CUDA device"
            continue
        fn, why = _import_attr(module, attr)
        if fn is None:
            unavailable[name] = why
            continue
        if name == "fa2":
            version = getattr(importlib.import_module("flash_attn"), "__version__", "")
            if not version.startswith("2."):
                unavailable[name] = f"flash_attn {version} is not 2.x"
                continue
        available[name] = _bshd_kernel(fn)
    return {k: available[k] for k in KERNELS if k in available}, {k: unavailable[k] for k in KERNELS if k in unavailable}


# ----- timing -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time in seconds of ``fn()`` (synchronizing the device around each call)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device | str, *, warmup: int = 2, repeats: int = 5
) -> dict[str, float]:
    """Median seconds of each ``fns[name]()``, measured in interleaved rounds (each round runs every
    function once, in an order that alternates between rounds), so that a noisy, shared machine
    slows all of them alike and their ratios stay meaningful."""
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> dict[str, float]:
    """FLOPs of non-causal attention (the FlashAttention benchmark convention).

    ``fwd = 4·B·S²·H·D``; model FLOPs fwd+bwd = ``3·fwd`` (= the ``12·d·s`` per-token term of
    ``ModelConfig.flops_per_token``); hardware fwd+bwd as FlashAttention counts it = ``3.5·fwd``
    (the backward's recompute of QKᵀ included).
    """
    fwd = 4.0 * batch * seq * seq * heads * head_dim
    return {"fwd": fwd, "fwd_bwd_model": 3.0 * fwd, "fwd_bwd_fa": 3.5 * fwd}


def time_attention(
    fn: AttentionFn, shape: tuple[int, int, int, int], *, device, dtype, backward: bool = True,
    warmup: int = 2, repeats: int = 5, seed: int = 0,
) -> float:
    """Median seconds of one forward (+ backward) of ``fn`` on random ``[B, H, S, D]`` inputs."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_(backward) for _ in range(3))
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    def run():
        out = fn(q, k, v)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    return time_call(run, device, warmup=warmup, repeats=repeats)


def check_kernel(fn: AttentionFn, shape: tuple[int, int, int, int], *, device, dtype, tol: float = 5e-2) -> float:
    """Max abs difference of ``fn``'s output against SDPA's math backend (small inputs); raises
    ``RuntimeError`` above ``tol``."""
    b, h, _, d = shape
    small = (b, h, min(shape[2], 256), d)
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(small, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        ref = _sdpa_kernel("sdpa_math")(q.float(), k.float(), v.float())
        err = float((fn(q, k, v).float() - ref).abs().max())
    if not err <= tol:
        raise RuntimeError(f"attention kernel differs from SDPA by {err:.3g} (> {tol})")
    return err


@dataclass
class AttentionChoice:
    """The picked kernel and the measurements behind it (seconds per fwd+bwd, median)."""

    name: str
    seconds: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def model_backend(self) -> str:
        """The ``model.attention`` backend name that runs this kernel."""
        return MODEL_BACKEND[self.name]

    def context(self):
        """Wrap each forward in this (pins SDPA to the picked backend; a no-op otherwise)."""
        return sdpa_context(self.name)


def pick_attention(
    device: torch.device | str, shape: tuple[int, int, int, int], *, dtype=torch.bfloat16,
    candidates: tuple[str, ...] | None = None, for_model: bool = False, warmup: int = 2, repeats: int = 5,
) -> AttentionChoice:
    """Time every available kernel (fwd+bwd) at ``shape`` ``[B, H, S, D]`` and pick the fastest.

    On CPU no timing is done: the choice is ``sdpa``. Kernels that fail to run or disagree with
    SDPA are recorded as unavailable with the reason. ``for_model=True`` keeps only kernels the
    installed ``model.attention`` can run.
    """
    device = torch.device(device)
    available, unavailable = attention_kernels(device)
    if candidates is not None:
        unknown = sorted(set(candidates) - set(KERNELS))
        if unknown:
            raise ValueError(f"unknown attention kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
        available = {k: v for k, v in available.items() if k in candidates}
    if for_model:
        from model.attention import BACKENDS

        for name in list(available):
            if MODEL_BACKEND[name] not in BACKENDS:
                unavailable[name] = f"model.attention has no backend {MODEL_BACKEND[name]!r}"
                del available[name]
    if device.type != "cuda":
        return AttentionChoice("sdpa", {}, unavailable)
    seconds: dict[str, float] = {}
    for name, fn in available.items():
        if name == "sdpa_math":  # materializes S×S scores: never the fastest at training shapes
            continue
        try:
            check_kernel(fn, shape, device=device, dtype=dtype)
            seconds[name] = time_attention(fn, shape, device=device, dtype=dtype, warmup=warmup, repeats=repeats)
        except Exception as exc:  # e.g. cuDNN refusing a shape, or a kernel built for another arch
            unavailable[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    if not seconds:
        return AttentionChoice("sdpa", seconds, unavailable)
    return AttentionChoice(min(seconds, key=seconds.get), seconds, unavailable)


def choose_attention(name: str, device, shape: tuple[int, int, int, int], *, dtype, **pick_kwargs) -> AttentionChoice:
    """The kernel a benchmark or run asked for: ``"pick"`` measures the available kernels at
    ``shape`` (B, H, S, D) and takes the fastest; a name from ``KERNELS`` is taken as is. Raises
    ValueError (one line) for an unknown name or a kernel that cannot run on ``device``."""
    if name == "pick":
        choice = pick_attention(device, shape, dtype=dtype, for_model=True, **pick_kwargs)
    elif name in KERNELS:
        choice = AttentionChoice(name)
    else:
        raise ValueError(f"--attention must be 'pick' or one of {', '.join(KERNELS)}, got {name!r}")
    available, unavailable = attention_kernels(device)
    if choice.name not in available:
        raise ValueError(f"attention kernel {choice.name!r} is unavailable here: {unavailable.get(choice.name, 'unknown')}")
    return choice


def apply_attention(model: nn.Module, choice: AttentionChoice | str) -> AttentionChoice:
    """Set ``model``'s attention backend for ``choice``; returns the choice (wrap each forward in
    ``choice.context()`` for ``sdpa_*`` kernels). Raises ValueError when ``model.attention`` cannot
    run the kernel."""
    from model.attention import BACKENDS

    if isinstance(choice, str):
        if choice not in KERNELS:
            raise ValueError(f"unknown attention kernel {choice!r}; choose from {', '.join(KERNELS)}")
        choice = AttentionChoice(choice)
    backend = choice.model_backend
    if backend not in BACKENDS:
        raise ValueError(
            f"attention kernel {choice.name!r} needs model.attention backend {backend!r}, which it does not "
            f"have (it has {', '.join(BACKENDS)})"
        )
    model.set_attention_backend(backend)
    return choice
