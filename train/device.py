"""Where a run computes: the device from ``train.device``, moving micro-batches there, and
``torch.compile`` of the model's blocks (``train.compile``). Nothing touches CUDA at import time."""

from __future__ import annotations

import torch
import torch.nn as nn


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU raises ValueError
    naming ``setting`` (the config key or command-line flag that asked for it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}=cuda but no CUDA device is available")
    return torch.device(name)


# ----- torch.compile per block ------------------------------------------------------------------
def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``), so parameter names,
    ``state_dict`` keys, hooks and checkpointing wrappers are unchanged. Fuses RMSNorm, RoPE and
    the SwiGLU product into a few kernels per block; identical blocks share one compiled graph.
    Returns ``model``. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if blocks is None:
        raise ValueError("compile_blocks: the model has no transformer.blocks (expected an LLaDAModel)")
    for block in blocks:
        block.compile(**compile_kwargs)
    return model


# ----- host -> device transfer ------------------------------------------------------------------
def to_device(batch, device: torch.device | str, *, pin: bool = True):
    """Move a tensor, or a dataclass/dict/list/tuple of tensors (e.g. ``train.engine.MicroBatch``),
    to ``device``. On CUDA, CPU tensors are pinned first and copied with ``non_blocking=True`` so
    the copy overlaps compute; on CPU (or when already there) the same objects come back unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return batch

    def move(x):
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu" and pin and torch.cuda.is_available():
                x = x.pin_memory()
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if hasattr(x, "__dataclass_fields__"):
            return type(x)(**{f: move(getattr(x, f)) for f in x.__dataclass_fields__})
        return x

    return move(batch)
