"""The single-process engine (``train.engine.Engine``): forward, loss, backward over micro-batches,
clip, step, with plain PyTorch AdamW on one device."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from model.objective import masked_logits, masked_token_losses, weighted_loss
from train.engine import MicroBatch, StepOutput
from train.device import to_device


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights), none on norm weights.
    The one optimizer of both engines (``train.parallelize`` hands it to DeepSpeed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batch_loss(model: nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(weighted loss, per-row masked CE sums)`` of one micro-batch."""
    logits = masked_logits(model, mb.input_ids, mb.masked)
    per_sample = masked_token_losses(logits, mb.targets, mb.masked, mb.p_mask)
    return weighted_loss(per_sample, mb.row_weight), per_sample


class LocalEngine:
    """One process, one device: plain PyTorch AdamW, gradient accumulation, clipping, autocast."""

    dp_rank = 0
    dp_size = 1
    is_logging_rank = True
    sequence_multiple = 1

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        grad_clip: float,
        precision: str,
        device: torch.device,
    ) -> None:
        self.model = model.to(device)
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.optimizer = build_optimizer(self.model, lr, weight_decay, betas, eps)

    def train_step(self, micro_batches: list[MicroBatch], lr: float, gate=None) -> StepOutput:
        """One optimizer step. ``gate`` (a ``train.guards.StepGate``, optional) is asked after
        backward and clipping, before the update; when it returns a reason the update is skipped:
        weights and AdamW state (incl. its step count) stay as they were, gradients are zeroed."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, per_sample = [], []
        for mb in micro_batches:
            mb = to_device(mb, self.device)
            with autocast_context(self.device, self.precision):
                loss, rows = micro_batch_loss(self.model, mb)
            loss.backward()
            # kept on the device: one host sync per step, not per micro-batch
            losses.append(loss.detach())
            per_sample.append(rows.detach())
        total = torch.stack(losses).double().sum()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        loss, norm = (float(v) for v in torch.stack([total, grad_norm.double()]).cpu())  # one host sync
        rows = torch.cat(per_sample).float().cpu()
        reason = None
        if gate is not None:
            weights = torch.cat([mb.row_weight for mb in micro_batches])
            reason = gate.decide(loss, norm, gate.row_stats(rows, weights))
        if reason is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, norm, rows, reason is not None, reason)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Per-row masked CE sums of the micro-batches, concatenated (no gradient)."""
        self.model.eval()
        rows = []
        for mb in micro_batches:
            mb = to_device(mb, self.device)
            with autocast_context(self.device, self.precision):
                rows.append(micro_batch_loss(self.model, mb)[1].float().cpu())
        return torch.cat(rows)

    # ----- state ------------------------------------------------------------------------------
    def model_state_dict(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """Full weights in the model's (LLaDA HF-prefix-free) names, on CPU (``only_rank0``: the
        parallel engine's switch; one process is rank 0)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    # ----- checkpoints (train.checkpoint) -----------------------------------------------------
    def checkpoint_state(self, optimizer: bool = True) -> dict:
        """This process's part of the checkpoint (``train.checkpoint``'s keys): every weight and
        AdamW moment whole, as live views (a save reads them, a load writes into them; then
        call :meth:`finish_checkpoint_load`)."""
        from train.checkpoint import MODEL_PREFIX, OPTIM_PREFIX, OPTIM_STEP, whole

        state: dict = {}
        for name, p in self.model.named_parameters():
            state[MODEL_PREFIX + name] = whole(p.data)
        if optimizer:
            self._ensure_optimizer_state()
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[f"{OPTIM_PREFIX}{name}/{key}"] = whole(self.optimizer.state[p][key])
            steps = [int(st["step"]) for st in self.optimizer.state.values() if "step" in st]
            state[OPTIM_STEP] = torch.tensor(max(steps, default=0), dtype=torch.int64)
        return state

    def finish_checkpoint_load(self, state: dict) -> None:
        """After ``train.checkpoint.load_state`` filled :meth:`checkpoint_state`'s views: set the
        AdamW step counters from the loaded ``optim/step``."""
        from train.checkpoint import OPTIM_STEP

        if OPTIM_STEP in state:
            step = float(int(state[OPTIM_STEP]))
            for st in self.optimizer.state.values():
                st["step"] = torch.tensor(step, dtype=torch.float32)

    def _ensure_optimizer_state(self) -> None:
        """AdamW's state as its first step would create it (step 0, zero moments) where missing."""
        for p in self.model.parameters():
            if p.requires_grad and "step" not in self.optimizer.state.get(p, {}):
                self.optimizer.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    # ----- layout-independent optimizer state (resharding) ------------------------------------
    def full_optimizer_state(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """AdamW state by parameter name, independent of any layout (``ParallelEngine`` writes
        and reads the same format): ``NAME::exp_avg`` and
        ``NAME::exp_avg_sq`` (fp32, CPU, the parameter's full shape; zeros before the first step)
        and ``::step`` (0-d int64, optimizer steps taken)."""
        out: dict[str, torch.Tensor] = {}
        step = 0
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                value = st.get(key)
                out[f"{name}::{key}"] = (
                    torch.zeros(p.shape, dtype=torch.float32) if value is None else value.detach().float().cpu().clone()
                )
            if "step" in st:
                step = int(st["step"])
        out["::step"] = torch.tensor(step, dtype=torch.int64)
        return out

    def load_full_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the AdamW state from :meth:`full_optimizer_state`'s format (any layout wrote it)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        wanted = ["::step"] + [f"{n}::{k}" for n, _ in named for k in ("exp_avg", "exp_avg_sq")]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"optimizer state: missing key(s) {', '.join(missing[:5])}")
        step = torch.tensor(float(int(state["::step"])), dtype=torch.float32)
        for name, p in named:
            entry = {"step": step.clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                value = state[f"{name}::{key}"]
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"optimizer state: {name}::{key} has shape {tuple(value.shape)}, the model {tuple(p.shape)}"
                    )
                entry[key] = value.detach().to(device=p.device, dtype=p.dtype).clone()
            self.optimizer.state[p] = entry

    def close(self) -> None:
        """Nothing to release (one process, no process groups)."""
