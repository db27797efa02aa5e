"""The engine interface: what the trainer asks of an engine, and the data it passes.

An engine owns the model and its optimizer and does one optimizer step from a list of
micro-batches. The trainer prepares the micro-batches (noise, masks, loss weights) and never
touches gradients itself. Two engines implement the interface: ``train.local_engine.LocalEngine``
(one process) and ``train.parallel_engine.ParallelEngine`` (DeepSpeed/megatron-core over a
TP×PP×DP layout), so the loop is the same in every layout.

The loss of a micro-batch is ``Σ_rows row_weight · Σ_{masked i} CE_i / p_mask``: the row weights
carry the normalization (``model.objective.row_weights``), so summing micro-batch losses over
accumulation steps and data-parallel ranks gives exactly the loss of the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, L] noisy ids (mask token where masked)
    targets: torch.Tensor  # [b, L] clean ids
    masked: torch.Tensor  # [b, L] bool
    p_mask: torch.Tensor  # [b]
    row_weight: torch.Tensor  # [b] loss weight of each row's masked-CE sum

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass
class StepOutput:
    loss: float  # the global batch's loss (this engine's share, summed over micro-batches)
    grad_norm: float  # total gradient norm before clipping
    per_sample: torch.Tensor  # [local batch] Σ CE/p_mask of each row (detached, CPU, fp32)
    skipped: bool = False  # the optimizer step was skipped (vetoed by the gate)
    skip_reason: str | None = None  # the gate's reason ("nonfinite", "spike", ...) when skipped
