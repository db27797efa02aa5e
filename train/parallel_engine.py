"""The parallel training engine: ``train.local_engine.LocalEngine``'s interface over a TP×PP×DP layout.

``build_parallel_engine(...)`` initializes ``torch.distributed`` (``cpu:gloo,cuda:nccl`` on GPU,
gloo on CPU; see :func:`process_group_backend`), megatron-core's groups and the DeepSpeed engine, and returns a
:class:`ParallelEngine`. Every rank of a step receives its data-parallel rank's micro-batches
(all TP/PP peers of a DP rank get the same ones) and returns the same ``StepOutput.loss``
(the global batch's loss) and ``grad_norm`` (global, before clipping).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.llada import LLaDAModel
from train.engine import MicroBatch, StepOutput
from train.guards import reason_code, reason_name
from train.layout import ParallelConfig, ParallelLayout
from train.parallelize import ParallelModel, parallelize, shard_of


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
    """Attributes for the trainer: ``dp_rank``/``dp_size`` (slice the global batch by these),
    ``tp_rank``, ``pp_rank``, ``is_logging_rank`` (global rank 0), ``layout``."""

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
        applied = getattr(self.engine, "was_step_applied", lambda: True)()
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
        base = self._base_optimizer()
        original = base.step

        def gated_step(*args, **kwargs):
            ctx = self._step_ctx
            if ctx is not None and ctx.gate is not None:
                if not ctx.decided:
                    self._decide(ctx)
                if ctx.reason is not None:
                    return None  # no update: weights, moments and the AdamW step count stay
            return original(*args, **kwargs)

        base.step = gated_step  # called per parameter group / ZeRO sub-group; decided once

    def _current_grad_norm(self) -> float:
        """The global grad norm DeepSpeed computed for this step (before its clipping)."""
        opt = self.engine.optimizer
        norm = None if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "_global_grad_norm", None)
        if norm is None:  # ZeRO-0 fp32: recorded by parallelize's model-parallel clipping
            norm = self.engine._global_grad_norm
        return float("nan") if norm is None else float(norm)

    def _decide(self, ctx: "_GateContext") -> None:
        """Global loss, bucket sums and grad norm -> the gate's verdict, agreed by all ranks. Collective."""
        from megatron.core import parallel_state as ps

        total, rows = self._gather_results(ctx.n_rows, reduce_dp=True)
        stats = ctx.gate.row_stats(rows, ctx.row_weight).to(self.device)
        if self.dp_size > 1:
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
        reason = ctx.gate.decide(total, self._current_grad_norm(), stats.cpu())
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

    # ----- weights ----------------------------------------------------------------------------
    def _local_fp32(self, p: torch.nn.Parameter) -> torch.Tensor:
        """This TP shard of a parameter in fp32, complete over ZeRO partitions (collective over
        DP for ZeRO-3 and for bf16 masters)."""
        if self.layout.zero_stage == 3 or self.precision == "bf16":
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(p)
            if full is not None:
                return full.detach().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        return p.detach().float().clone()

    def _gather_full(self, local_tensors, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """Full single-device tensors assembled from every rank. ``local_tensors(name, p)`` gives
        ``(key, this rank's tensor)`` pairs for parameter ``p``; TP shards are gathered along
        ``p.partition_dim`` and the pipeline stages' dicts merged. Collective: every rank calls it.

        ``only_rank0``: only global rank 0 receives the result (the others return ``{}``): TP
        shards go to the TP group's first rank of data-parallel replica 0 only, one tensor at a
        time, and the stage dicts to rank 0, so no other rank holds more than its stage's share
        (what a checkpoint save needs; the default gives every rank everything)."""
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        receives = not only_rank0 or (self.dp_rank == 0 and self.tp_rank == 0)
        replica0 = not only_rank0 or self.dp_rank == 0
        state: dict[str, torch.Tensor] = {}
        for layer in self.pm.layers:
            for name, p in layer.full_named_parameters():
                for key, local in local_tensors(name, p):  # collective over DP under ZeRO: every rank
                    local = local.contiguous()
                    if getattr(p, "tensor_model_parallel", False) and self.layout.tp > 1 and replica0:
                        if only_rank0:
                            parts = [torch.empty_like(local) for _ in range(self.layout.tp)] if receives else None
                            dist.gather(local, parts, dst=dist.get_global_rank(tp_group, 0), group=tp_group)
                        else:
                            parts = [torch.empty_like(local) for _ in range(self.layout.tp)]
                            dist.all_gather(parts, local, group=tp_group)
                        local = torch.cat(parts, dim=p.partition_dim) if receives else local
                    if receives:
                        state[key] = local.cpu()
        if self.layout.pp > 1 and receives:  # the PP group of (dp 0, tp 0) holds global rank 0
            group = ps.get_pipeline_model_parallel_group()
            if only_rank0:
                stages: list | None = [None] * self.layout.pp if dist.get_rank() == 0 else None
                dist.gather_object(state, stages, dst=0, group=group)
            else:
                stages = [None] * self.layout.pp
                dist.all_gather_object(stages, state, group=group)
            state = {k: v for stage in stages for k, v in stage.items()} if stages is not None else {}
        return state if (not only_rank0 or dist.get_rank() == 0) else {}

    def model_state_dict(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """The full single-device state dict (LLaDA names, fp32, CPU) on every rank (or, with
        ``only_rank0``, on global rank 0 only; the others get ``{}``): TP shards gathered along
        their partition dims, pipeline stages and ZeRO partitions merged. Collective: every rank
        must call it."""
        return self._gather_full(lambda name, p: [(name, self._local_fp32(p))], only_rank0)

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full single-device weights: each rank copies its shard into the module and into
        DeepSpeed's fp32 master partitions. Collective under ZeRO-3."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        expected = {name for layer in self.pm.layers for name, _ in layer.full_named_parameters()}
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"model state: missing key(s) {', '.join(missing[:5])}")
        if self.layout.pp == 1:
            unexpected = sorted(set(state) - expected)
            if unexpected:
                raise ValueError(f"model state: unexpected key(s) {', '.join(unexpected[:5])}")
        with torch.no_grad():
            for layer in self.pm.layers:
                for name, p in layer.full_named_parameters():
                    shard = shard_of(state[name], p, self.layout.tp, self.tp_rank).float().to(self.device)
                    if self.layout.zero_stage == 3:
                        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                            p.data.copy_(shard.reshape(p.shape).to(p.dtype))
                    else:
                        p.data.copy_(shard.to(p.dtype))
                    if self.layout.zero_stage > 0 or self.precision == "bf16":
                        safe_set_full_fp32_param(p, shard)

    def optimizer_state_dict(self) -> dict:
        raise NotImplementedError(
            "parallel engine: optimizer state is sharded by DeepSpeed; use engine.save(dir) / engine.load(dir)"
        )

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer_state_dict()

    # ----- layout-independent optimizer state (resharding) ------------------------------------
    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW under DeepSpeed's wrapper: the client optimizer itself (ZeRO-0 fp32)
        or the one stepping the flat fp32 partitions (ZeRO-1/2, bf16)."""
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer

    def _ensure_optimizer_state(self) -> None:
        """Create AdamW's state (step 0, zero moments: what its first step would create) where
        it does not exist yet, and (re)link DeepSpeed's per-parameter views of the flat ZeRO
        partitions' state, so it can be read or written before the first step."""
        base = self._base_optimizer()
        wrapper = self.engine.optimizer
        flat = [q for group in base.param_groups for q in group["params"]]
        flat += list(getattr(wrapper, "fp32_partitioned_groups_flat", []))  # ZeRO-3 sub-groups
        for q in flat:
            st = base.state[q]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(q, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(q, memory_format=torch.preserve_format)
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()

    def _local_optimizer_state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor:
        """This TP shard's fp32 AdamW state ``key``, complete over ZeRO partitions (collective
        over DP under ZeRO)."""
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            from deepspeed.utils import safe_get_full_optimizer_state

            full = safe_get_full_optimizer_state(p, key)
            return full.detach().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        return self._base_optimizer().state[p][key].detach().float().clone()

    def full_optimizer_state(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """AdamW state in the layout-independent format of ``LocalEngine.full_optimizer_state``,
        on every rank (or only on global rank 0 with ``only_rank0``; the others get ``{}``): ``NAME::exp_avg`` / ``NAME::exp_avg_sq`` (full fp32 tensors on CPU, TP
        shards gathered, ZeRO partitions and pipeline stages merged; LLaDA names as in
        :meth:`model_state_dict`) and ``::step`` (0-d int64). Collective: every rank calls it."""
        self._ensure_optimizer_state()
        state = self._gather_full(
            lambda name, p: [(f"{name}::{key}", self._local_optimizer_state(p, key)) for key in ("exp_avg", "exp_avg_sq")],
            only_rank0,
        )
        steps = [int(st["step"]) for st in self._base_optimizer().state.values() if "step" in st]
        step = torch.tensor(max(steps, default=0), dtype=torch.int64, device=self.device)
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        if not only_rank0 or dist.get_rank() == 0:
            state["::step"] = step.cpu()
        return state

    def load_full_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`full_optimizer_state`'s format (written by any layout or by LocalEngine):
        each rank slices its TP shard of every moment and writes it into DeepSpeed's fp32
        partitions (``safe_set_full_optimizer_state``) or the plain AdamW state (ZeRO-0 fp32),
        and sets every AdamW step counter (and DeepSpeed's ``global_steps``) to ``::step``.
        Load the weights with :meth:`load_model_state_dict` as well."""
        from deepspeed.utils import safe_set_full_optimizer_state

        from train.parallelize import full_shape

        named = [(n, p) for layer in self.pm.layers for n, p in layer.full_named_parameters()]
        wanted = ["::step"] + [f"{n}::{k}" for n, _ in named for k in ("exp_avg", "exp_avg_sq")]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"optimizer state: missing key(s) {', '.join(missing[:5])}")
        self._ensure_optimizer_state()
        base = self._base_optimizer()
        with torch.no_grad():
            for name, p in named:
                for key in ("exp_avg", "exp_avg_sq"):
                    full = state[f"{name}::{key}"]
                    shape = p.ds_shape if hasattr(p, "ds_shape") else full_shape(p, self.layout.tp)
                    if tuple(full.shape) != tuple(shape) and not hasattr(p, "ds_id"):
                        raise ValueError(
                            f"optimizer state: {name}::{key} has shape {tuple(full.shape)}, the model {tuple(shape)}"
                        )
                    shard = shard_of(full, p, self.layout.tp, self.tp_rank).float().to(self.device)
                    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                        safe_set_full_optimizer_state(p, shard, key)
                    else:
                        base.state[p][key].copy_(shard.reshape(base.state[p][key].shape))
        step = int(state["::step"])
        for st in base.state.values():
            st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
        self.engine.global_steps = step

    # ----- checkpoints (train.checkpoint): this rank's chunks of the full tensors --------------
    def _tp_base(self, p, local_shape) -> tuple[int, ...]:
        """Offset of this rank's TP shard of ``p`` in the full tensor."""
        base = [0] * len(local_shape)
        if getattr(p, "tensor_model_parallel", False) and self.layout.tp > 1:
            base[p.partition_dim] = self.tp_rank * local_shape[p.partition_dim]
        return tuple(base)

    def _fp32_pieces(self, p, moments: bool = True) -> tuple[int, tuple[int, ...], torch.Tensor | None, dict]:
        """``(start, local shape, fp32 master view, {moment: view})`` of the part of ``p`` this
        rank owns: a 1-D range starting at element ``start`` of the flattened TP shard under
        ZeRO-1/2/3 and bf16 (DeepSpeed's fp32 partition), or the whole TP shard (ZeRO-0 fp32).
        Views of the live tensors (``None`` when this rank owns no part of ``p``)."""
        keys = ("exp_avg", "exp_avg_sq") if moments else ()
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened parameter
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            size = p.partition_numel()
            start = dist.get_rank(group=p.ds_process_group) * size
            valid = max(0, min(size, p.ds_numel - start))
            master = safe_get_local_fp32_param(p).narrow(0, 0, valid)
            views = {k: safe_get_local_optimizer_state(p, k).narrow(0, 0, valid) for k in keys}
            return start, tuple(p.ds_shape), master, views
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and bf16: a fragment of the flattened shard
            frag = p._hp_mapping
            if frag is None:
                return 0, tuple(p.shape), None, {}
            views = {k: frag.get_optim_state_fragment(k) for k in keys} if frag.optim_fragment else {}
            return frag.lp_fragment_address.start, tuple(p.shape), frag.get_hp_fragment(), views
        st = self._base_optimizer().state.get(p, {})
        return 0, tuple(p.shape), p.data.view(-1), {k: st[k].view(-1) for k in keys if k in st}

    def checkpoint_state(self, optimizer: bool = True) -> dict:
        """This rank's part of the checkpoint (``train.checkpoint``'s keys): for every parameter of
        its stage, the chunks of the full fp32 weight and AdamW moments it owns, as views of the
        live tensors (a save reads them; a load writes into them, then call
        :meth:`finish_checkpoint_load`). DP replicas describe equal chunks (DCP writes one)."""
        from train.checkpoint import MODEL_PREFIX, OPTIM_PREFIX, OPTIM_STEP, Sharded, fragment_chunks

        if optimizer:
            self._ensure_optimizer_state()
        state: dict = {}
        for layer in self.pm.layers:
            for name, p in layer.full_named_parameters():
                start, local_shape, master, moments = self._fp32_pieces(p, moments=optimizer)
                base = self._tp_base(p, local_shape)
                size = list(local_shape)
                if getattr(p, "tensor_model_parallel", False) and self.layout.tp > 1:
                    size[p.partition_dim] *= self.layout.tp
                size = tuple(size)
                pieces = {MODEL_PREFIX + name: master}
                if optimizer:
                    pieces.update({f"{OPTIM_PREFIX}{name}/{k}": moments.get(k) for k in ("exp_avg", "exp_avg_sq")})
                for key, flat in pieces.items():
                    chunks = [] if flat is None else fragment_chunks(flat, local_shape, start, base)
                    state[key] = Sharded(size, torch.float32, chunks)
        if optimizer:
            steps = [int(st["step"]) for st in self._base_optimizer().state.values() if "step" in st]
            step = torch.tensor(max(steps, default=0), dtype=torch.int64, device=self.device)
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            state[OPTIM_STEP] = step.cpu()
        return state

    def finish_checkpoint_load(self, state: dict) -> None:
        """After ``train.checkpoint.load_state`` filled :meth:`checkpoint_state`'s views: bring
        the working weights up to date from the fp32 masters (ZeRO-1/2/bf16: DeepSpeed's
        ``update_lp_params``, an all-gather over DP; ZeRO-3: this rank's partition) and set every
        AdamW step counter (and DeepSpeed's ``global_steps``) to the loaded ``optim/step``.
        Collective under ZeRO-1/2 and bf16."""
        from train.checkpoint import OPTIM_STEP

        params = [p for layer in self.pm.layers for _, p in layer.full_named_parameters()]
        with torch.no_grad():
            if any(hasattr(p, "ds_id") for p in params):
                for p in params:
                    _, _, master, _ = self._fp32_pieces(p, moments=False)
                    p.ds_tensor.data.view(-1).narrow(0, 0, master.numel()).copy_(master)
            elif any(hasattr(p, "_hp_mapping") for p in params):
                self.engine.optimizer.update_lp_params()
        if OPTIM_STEP in state:
            step = int(state[OPTIM_STEP])
            for st in self._base_optimizer().state.values():
                st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
            self.engine.global_steps = step

    # ----- DeepSpeed checkpoints (resume in the same layout) -----------------------------------
    def save(self, directory: str) -> None:
        """Save the engine (sharded model + optimizer state) to ``directory`` atomically (a
        temporary folder then ``os.replace`` by rank 0; the folder must be shared by all ranks)."""
        tmp = directory.rstrip("/") + ".tmp"
        if dist.get_rank() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        self.engine.save_checkpoint(tmp, tag="engine")
        dist.barrier()
        if dist.get_rank() == 0:
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        dist.barrier()

    def load(self, directory: str) -> None:
        if not os.path.isdir(os.path.join(directory, "engine")):
            raise FileNotFoundError(f"no DeepSpeed engine checkpoint in {directory}")
        path, _ = self.engine.load_checkpoint(directory, tag="engine")
        if path is None:
            raise FileNotFoundError(f"could not load the DeepSpeed engine checkpoint in {directory}")

    def close(self) -> None:
        """Release the engine and megatron's groups (lets one process build another layout)."""
        from megatron.core import parallel_state as ps

        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        ps.destroy_model_parallel()


@contextlib.contextmanager
def default_group_timeout(timeout_s: float | None):
    """Process groups created inside get ``timeout_s`` instead of torch's default (30 min):
    DeepSpeed's pipeline topology calls ``dist.new_group(ranks)`` without a timeout. Sets torch's
    module defaults (``distributed_c10d.default_pg_timeout`` / ``default_pg_nccl_timeout``, present
    in torch 2.11-2.13) for the duration; a no-op when they are missing or ``timeout_s`` is None."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    names = [n for n in ("default_pg_timeout", "default_pg_nccl_timeout") if hasattr(c10d, n)]
    if timeout_s is None or not names:
        yield
        return
    saved = {n: getattr(c10d, n) for n in names}
    try:
        for n in names:
            if saved[n] is not None:
                setattr(c10d, n, timedelta(seconds=timeout_s))
        yield
    finally:
        for n, v in saved.items():
            setattr(c10d, n, v)


def process_group_backend(use_cuda: bool) -> str:
    """The backend of every process group: on GPUs a device map, NCCL for CUDA tensors and gloo
    for CPU tensors (a plain ``"nccl"`` group raises "No backend type associated with device type
    cpu" on the first CPU-tensor collective, whoever issues it); gloo alone on CPU. Groups created
    later without a backend (megatron's, DeepSpeed's) inherit the map from the default group."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_distributed(use_cuda: bool, timeout_s: float | None = None) -> None:
    """Initialize ``torch.distributed`` from torchrun's environment (no-op if already done) with
    :func:`process_group_backend`; a plain single process (no ``RANK`` in the environment)
    becomes a world of one on localhost. DeepSpeed's communication layer then wraps that group."""
    import deepspeed

    if not use_cuda:
        from train import cpu_shim

        cpu_shim.apply()
    if not dist.is_initialized() and "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta

    extra = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(use_cuda), **extra)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False, **extra)


def tp_overlap_environment() -> None:
    """megatron's tensor-parallel layers overlap their all-gather / reduce-scatter with the GEMMs
    only if CUDA runs kernels in launch order: ``CUDA_DEVICE_MAX_CONNECTIONS=1``, read when the CUDA
    context is created. Set it (unless the user did) before this process creates one."""
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        return
    if torch.cuda.is_initialized():
        import warnings

        warnings.warn("parallel.tp > 1: set CUDA_DEVICE_MAX_CONNECTIONS=1 before CUDA starts for TP overlap")
        return
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


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
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
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
