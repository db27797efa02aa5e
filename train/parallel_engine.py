"""The parallel training engine: ``train.engine.Engine`` over a TP×PP×DP layout.

``build_parallel_engine(...)`` initializes ``torch.distributed`` (``train.distributed``),
megatron-core's groups and the DeepSpeed engine, and returns a :class:`ParallelEngine`. The
step, evaluation and the guard's veto point are here; the engine's state (full tensors,
checkpoint chunks) is gathered and scattered by ``train.engine_state``. Every rank of a step
receives its data-parallel rank's micro-batches (all TP/PP peers of a DP rank get the same ones)
and returns the same ``StepOutput.loss`` (the global batch's loss) and ``grad_norm`` (global,
before clipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.llada import LLaDAModel
from train import engine_state, internals
from train.distributed import default_group_timeout, init_distributed, local_device, tp_overlap_environment
from train.engine import MicroBatch, StepOutput
from train.guards import reason_code, reason_name
from train.layout import ParallelConfig, ParallelLayout
from train.parallelize import ParallelModel, parallelize


@dataclass
class _GateContext:
    """One step's gate and what it decided (see ``ParallelEngine.train_step``)."""

    gate: object | None
    n_rows: int
    row_weight: torch.Tensor
    decided: bool = False
    reason: str | None = None
    results: tuple[float, torch.Tensor] | None = None


class ParallelEngine:
    """``train.engine.Engine`` over a TP×PP×DP layout; also ``tp_rank``, ``pp_rank``, ``layout``
    and ``pm`` (this rank's layers, for ``train.engine_state``)."""

    device: torch.device
    dp_rank: int
    dp_size: int
    is_logging_rank: bool
    sequence_multiple: int

    def __init__(self, parallel_model: ParallelModel, precision: str) -> None:
        from megatron.core import parallel_state as ps

        self.pm = parallel_model
        self.engine = parallel_model.engine
        self.layout = parallel_model.layout
        self.device = parallel_model.device
        self.precision = precision
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.is_logging_rank = dist.get_rank() == 0
        # megatron scatters the sequence over the TP ranks under sequence parallelism
        self.sequence_multiple = self.layout.tp if self.layout.sequence_parallel else 1
        self._pipe_shape: tuple | None = None
        self._step_ctx: _GateContext | None = None
        self._install_gate()

    # ----- steps ------------------------------------------------------------------------------
    def _check_count(self, micro_batches: list[MicroBatch]) -> None:
        expected = self.layout.grad_accum_steps
        if len(micro_batches) != expected:
            raise ValueError(
                f"parallel engine: expected {expected} micro-batches per data-parallel rank "
                f"(global batch / (micro_batch_size·dp)), got {len(micro_batches)}"
            )

    def _pipe_data(self, micro_batches: list[MicroBatch]) -> list:
        shape = tuple(tuple(mb.input_ids.shape) for mb in micro_batches)
        if shape != self._pipe_shape:  # seq length or micro-batch size changed: new p2p buffers
            self.engine.reset_activation_shape()
            self._pipe_shape = shape
        return [
            (mb.input_ids, (mb.targets, mb.masked, mb.p_mask, mb.row_weight.float()))
            for mb in (m.to(self.device) for m in micro_batches)
        ]

    def _gather_results(self, n_rows: int, reduce_dp: bool) -> tuple[float, torch.Tensor]:
        """The recorded loss (summed over micro-batches, and over DP when ``reduce_dp``) and the
        per-row sums, made identical on every pipeline stage."""
        from megatron.core import parallel_state as ps

        loss_fn = self.pm.loss
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = torch.zeros(n_rows, dtype=torch.float32, device=self.device)
        if loss_fn.losses:
            total += torch.stack(loss_fn.losses).sum()
            rows += torch.cat(loss_fn.rows)
        if reduce_dp and self.dp_size > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        if self.layout.pp > 1:  # only the last stage computed them; the others hold zeros
            group = ps.get_pipeline_model_parallel_group()
            dist.all_reduce(total, group=group)
            dist.all_reduce(rows, group=group)
        return float(total), rows.cpu()

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, micro_batches: list[MicroBatch], lr: float, gate=None) -> StepOutput:
        """One optimizer step over this DP rank's micro-batches. Returns the global loss, the
        global grad norm before clipping and this DP rank's per-row masked CE sums (the same on
        all TP/PP peers).

        ``gate`` (a ``train.guards.StepGate``, optional) is asked once per step on every rank,
        when DeepSpeed has reduced the gradients and computed the grad norm but before the AdamW
        update (:meth:`_install_gate` wraps the torch optimizer's ``step``, which every DeepSpeed
        path -- ZeRO-0/1/2/3, bf16, the pipeline schedule -- calls last); its verdict is
        all-reduced (MAX) over all ranks, and a veto skips the update everywhere. When DeepSpeed
        itself discards the step (a non-finite norm under fp32 ZeRO) the gate is asked after it."""
        self._check_count(micro_batches)
        self._set_lr(lr)
        self.pm.loss.reset(scale=float(self.layout.grad_accum_steps * self.dp_size))
        n_rows = sum(mb.input_ids.shape[0] for mb in micro_batches)
        ctx = _GateContext(gate, n_rows, torch.cat([mb.row_weight for mb in micro_batches]).cpu())
        self._step_ctx = ctx
        try:
            if self.layout.pp > 1:
                self.engine.train_batch(data_iter=iter(self._pipe_data(micro_batches)))
            else:
                self.engine.train()
                for mb in micro_batches:
                    mb = mb.to(self.device)
                    logits = self.engine(mb.input_ids)
                    loss = self.pm.loss(logits, (mb.targets, mb.masked, mb.p_mask, mb.row_weight))
                    self.engine.backward(loss)
                    self.engine.step()
        finally:
            self._step_ctx = None
        applied = self.engine.was_step_applied()
        if gate is not None and not ctx.decided:  # DeepSpeed skipped the update before asking
            self._decide(ctx)
        total, rows = ctx.results if ctx.results is not None else self._gather_results(n_rows, reduce_dp=True)
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        reason = ctx.reason
        if reason is None and not applied:
            reason = "nonfinite"  # DeepSpeed's own overflow check discarded the step
        return StepOutput(loss=total, grad_norm=norm, per_sample=rows, skipped=reason is not None, skip_reason=reason)

    # ----- the veto point ---------------------------------------------------------------------
    def _install_gate(self) -> None:
        def veto() -> bool:  # asked before every AdamW update; decided once per step
            ctx = self._step_ctx
            if ctx is None or ctx.gate is None:
                return False
            if not ctx.decided:
                self._decide(ctx)
            return ctx.reason is not None  # no update: weights, moments and the AdamW step count stay

        internals.gate_optimizer_step(self.engine, veto)

    def _decide(self, ctx: "_GateContext") -> None:
        """Global loss, bucket sums and grad norm -> the gate's verdict, agreed by all ranks. Collective."""
        from megatron.core import parallel_state as ps

        total, rows = self._gather_results(ctx.n_rows, reduce_dp=True)
        stats = ctx.gate.row_stats(rows, ctx.row_weight).to(self.device)
        if self.dp_size > 1:
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
        reason = ctx.gate.decide(total, internals.global_grad_norm(self.engine), stats.cpu())
        code = torch.tensor([reason_code(reason)], device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)  # one rank's veto is every rank's
        ctx.results, ctx.reason, ctx.decided = (total, rows), reason_name(int(code.item())), True

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Per-row masked CE sums ``[rows]`` of this DP rank's micro-batches (no gradient)."""
        self.pm.loss.reset(scale=1.0)
        n_rows = sum(mb.input_ids.shape[0] for mb in micro_batches)
        if self.layout.pp > 1:
            data = self._pipe_data(micro_batches)
            self.engine.eval_batch(iter(data), num_micro_batches=len(data), bcast_loss=False)
        else:
            self.engine.eval()
            for mb in micro_batches:
                mb = mb.to(self.device)
                self.pm.loss(self.engine(mb.input_ids), (mb.targets, mb.masked, mb.p_mask, mb.row_weight))
            self.engine.train()
        return self._gather_results(n_rows, reduce_dp=False)[1]

    # ----- state (train.engine_state) ---------------------------------------------------------
    def checkpoint_state(self, optimizer: bool = True) -> dict:
        """This rank's chunks of the full fp32 weights and AdamW moments, as live views
        (``train.engine_state.checkpoint_state``)."""
        return engine_state.checkpoint_state(self, optimizer)

    def finish_checkpoint_load(self, state: dict) -> None:
        """Working weights and step counters after a load (``train.engine_state``). Collective."""
        engine_state.finish_checkpoint_load(self, state)

    def model_state_dict(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """Full single-device weights (``train.engine_state.model_state_dict``). Collective."""
        return engine_state.model_state_dict(self, only_rank0)

    def full_optimizer_state(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """Layout-free AdamW state (``train.engine_state.full_optimizer_state``). Collective."""
        return engine_state.full_optimizer_state(self, only_rank0)

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full single-device weights (``train.engine_state.load_model_state_dict``)."""
        engine_state.load_model_state_dict(self, state)

    def load_full_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load layout-free AdamW state (``train.engine_state.load_full_optimizer_state``)."""
        engine_state.load_full_optimizer_state(self, state)

    def close(self) -> None:
        """Release the engine and megatron's groups (lets one process build another layout)."""
        from megatron.core import parallel_state as ps

        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        ps.destroy_model_parallel()


def build_parallel_engine(
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    *,
    world_size: int,
    seed: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    grad_clip: float,
    precision: str,
    micro_batch_size: int,
    global_batch_size: int,
    activation_checkpointing: str = "none",
    attention_backend: str = "auto",
    model: LLaDAModel | None = None,
    collective_timeout_s: float | None = None,
) -> ParallelEngine:
    """Validate the layout, set up process groups and build the engine on this rank.

    The weights are drawn as ``build_model(model_config, seed)`` would draw them, or sliced from
    ``model`` when one is given. Run under ``torchrun`` (``world_size`` = its WORLD_SIZE).
    """
    layout = ParallelLayout.from_config(
        parallel_config, world_size, model_config, micro_batch_size, global_batch_size
    )
    if precision == "bf16" and layout.pp > 1 and layout.zero_stage == 0:
        raise ValueError(
            "parallel config: precision=bf16 with pipeline parallelism needs parallel.zero_stage=1 "
            "(DeepSpeed's bf16 ZeRO-0 pipeline path is not supported here)"
        )
    use_cuda = torch.cuda.is_available()
    if use_cuda and layout.tp > 1:
        tp_overlap_environment()
    init_distributed(use_cuda, collective_timeout_s)
    device = local_device(use_cuda)
    layout.initialize_process_groups(collective_timeout_s)
    with default_group_timeout(collective_timeout_s):  # DeepSpeed's own (pipeline) groups
        parallel_model = parallelize(
            model if model is not None else model_config,
            layout,
            seed=seed,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            grad_clip=grad_clip,
            precision=precision,
            activation_checkpointing=activation_checkpointing,
            attention_backend=attention_backend,
            device=device,
        )
    return ParallelEngine(parallel_model, precision)
