"""The engine interface: what the trainer asks of an engine, and the data it passes.

An engine owns the model and its optimizer and does one optimizer step from a list of
micro-batches. The trainer prepares the micro-batches (noise, masks, loss weights) and never
touches gradients itself. Two engines implement the interface: ``train.local_engine.LocalEngine``
(one process) and ``train.parallel_engine.ParallelEngine`` (DeepSpeed/megatron-core over a
TP×PP×DP layout), so the loop is the same in every layout. :class:`Engine` lists everything the
trainer, the checkpoint module and the tools ask of an engine; nothing else of an engine is used
outside its own module.

The loss of a micro-batch is ``Σ_rows row_weight · Σ_{masked i} CE_i / p_mask``: the row weights
carry the normalization (``model.objective.row_weights``), so summing micro-batch losses over
accumulation steps and data-parallel ranks gives exactly the loss of the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Engine(Protocol):
    """What the trainer, ``train.checkpoint`` and the tools use of an engine (and nothing else).

    ``tests/train/test_engine.py`` checks that both engines have every member listed here, with
    the same parameters."""

    device: torch.device  # where micro-batches and collective buffers go
    dp_rank: int  # this process's data-parallel rank: its slice of the global batch
    dp_size: int  # data-parallel ranks (the global batch is split over them)
    is_logging_rank: bool  # the one process that logs and writes run files (global rank 0)
    sequence_multiple: int  # every step's sequence length is a multiple of it (TP under sequence parallelism)

    def train_step(self, micro_batches: list[MicroBatch], lr: float, gate=None) -> StepOutput:
        """One optimizer step over this data-parallel rank's micro-batches (``gate``: a
        ``train.guards.StepGate`` asked before the update; a veto skips it on every rank)."""
        ...

    def eval_loss(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Per-row masked CE sums ``[rows]`` of this data-parallel rank's micro-batches, no gradient."""
        ...

    def checkpoint_state(self, optimizer: bool = True) -> dict:
        """This rank's part of a checkpoint (``train.checkpoint``'s keys) as live views of its
        weights and AdamW state: a save reads them, a load writes into them."""
        ...

    def finish_checkpoint_load(self, state: dict) -> None:
        """After a load filled :meth:`checkpoint_state`'s views: derived state (working weights,
        AdamW step counters) brought up to date. Collective on the parallel engine."""
        ...

    def model_state_dict(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """The full single-device weights (model names, CPU); ``only_rank0``: only global rank 0
        gets them (the others ``{}``). Collective on the parallel engine."""
        ...

    def full_optimizer_state(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """AdamW state by parameter name in a layout-free format (``NAME::exp_avg``,
        ``NAME::exp_avg_sq``, ``::step``). Collective on the parallel engine."""
        ...

    def close(self) -> None:
        """Release what the engine holds (process groups, DeepSpeed's engine)."""
        ...
