"""megatron-core and DeepSpeed without CUDA: the few patches they need on CPU-only machines.

megatron-core 0.16.1 allocates communication buffers with ``device=torch.cuda.current_device()``
(TP gather/scatter, sequence parallelism) and drives its RNG tracker through ``torch.cuda``
RNG calls. :func:`apply` points those at the CPU. It does nothing when CUDA is available, and it
is idempotent. DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op on every
``init_distributed`` (20+ s the first time); :func:`apply` skips that build, and gloo is used.
The private megatron/DeepSpeed hooks are in ``train.internals``; the ``torch.cuda`` replacements
here are listed there (``STAYS_IN_PLACE``).

The optional ``factory_mode`` also rewrites ``device="cuda"`` tensor factories (megatron's
pipeline schedules, ``broadcast_data``, the default causal mask); our layout does not need them,
and the mode adds Python overhead to every torch call, so it is off by default.
"""

from __future__ import annotations

import torch

from train import internals


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def is_applied() -> bool:
    return getattr(torch.cuda.current_device, "__difftron_shim__", False)


def apply(factory_mode: bool = False) -> bool:
    """Patch ``torch.cuda`` entry points used by megatron-core; returns True if patched now."""
    if torch.cuda.is_available() or is_applied():
        return False
    cpu = torch.device("cpu")

    def current_device():
        return cpu

    current_device.__difftron_shim__ = True
    torch.cuda.current_device = current_device  # TP mappings, RoPE buffers, p2p buffers
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # RNG tracker
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    internals.cpu_rng_state_setter()
    internals.skip_shm_build()
    if factory_mode:
        _CudaToCpuMode().__enter__()
    return True

