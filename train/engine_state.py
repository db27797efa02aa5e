"""The parallel engine's state, gathered and scattered: full single-device tensors from every
rank's shards (``model_state_dict``, ``full_optimizer_state``), loading them back, and each
rank's chunks of the full tensors for ``train.checkpoint`` (``checkpoint_state``,
``finish_checkpoint_load``).

Every function takes a ``train.parallel_engine.ParallelEngine`` (its ``pm.layers``, ``layout``,
``tp_rank``/``dp_rank`` and DeepSpeed ``engine``) and is collective where its docstring says so.
Names are the single-device model's; TP shards are placed by ``partition_dim``; ZeRO partitions
are reached through ``train.internals``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from train import internals
from train.parallelize import full_shape, shard_of


def local_fp32(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """This TP shard of a parameter in fp32, complete over ZeRO partitions (collective over
    DP for ZeRO-3 and for bf16 masters)."""
    if engine.layout.zero_stage == 3 or engine.precision == "bf16":
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)
        if full is not None:
            return full.detach().float().reshape(internals.unpartitioned_shape(p))
    return p.detach().float().clone()


def gather_full(engine, local_tensors, only_rank0: bool = False) -> dict[str, torch.Tensor]:
    """Full single-device tensors assembled from every rank. ``local_tensors(name, p)`` gives
    ``(key, this rank's tensor)`` pairs for parameter ``p``; TP shards are gathered along
    ``p.partition_dim`` and the pipeline stages' dicts merged. Collective: every rank calls it.

    ``only_rank0``: only global rank 0 receives the result (the others return ``{}``): TP
    shards go to the TP group's first rank of data-parallel replica 0 only, one tensor at a
    time, and the stage dicts to rank 0, so no other rank holds more than its stage's share
    (what a checkpoint save needs; the default gives every rank everything)."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    receives = not only_rank0 or (engine.dp_rank == 0 and engine.tp_rank == 0)
    replica0 = not only_rank0 or engine.dp_rank == 0
    state: dict[str, torch.Tensor] = {}
    for layer in engine.pm.layers:
        for name, p in layer.full_named_parameters():
            for key, local in local_tensors(name, p):  # collective over DP under ZeRO: every rank
                local = local.contiguous()
                dim = internals.tp_partition_dim(p)
                if dim is not None and engine.layout.tp > 1 and replica0:
                    if only_rank0:
                        parts = [torch.empty_like(local) for _ in range(engine.layout.tp)] if receives else None
                        dist.gather(local, parts, dst=dist.get_global_rank(tp_group, 0), group=tp_group)
                    else:
                        parts = [torch.empty_like(local) for _ in range(engine.layout.tp)]
                        dist.all_gather(parts, local, group=tp_group)
                    local = torch.cat(parts, dim=dim) if receives else local
                if receives:
                    state[key] = local.cpu()
    if engine.layout.pp > 1 and receives:  # the PP group of (dp 0, tp 0) holds global rank 0
        group = ps.get_pipeline_model_parallel_group()
        if only_rank0:
            stages: list | None = [None] * engine.layout.pp if dist.get_rank() == 0 else None
            dist.gather_object(state, stages, dst=0, group=group)
        else:
            stages = [None] * engine.layout.pp
            dist.all_gather_object(stages, state, group=group)
        state = {k: v for stage in stages for k, v in stage.items()} if stages is not None else {}
    return state if (not only_rank0 or dist.get_rank() == 0) else {}


def model_state_dict(engine, only_rank0: bool = False) -> dict[str, torch.Tensor]:
    """The full single-device state dict (LLaDA names, fp32, CPU) on every rank (or, with
    ``only_rank0``, on global rank 0 only; the others get ``{}``): TP shards gathered along
    their partition dims, pipeline stages and ZeRO partitions merged. Collective: every rank
    must call it."""
    return gather_full(engine, lambda name, p: [(name, local_fp32(engine, p))], only_rank0)


def load_model_state_dict(engine, state: dict[str, torch.Tensor]) -> None:
    """Load full single-device weights: each rank copies its shard into the module and into
    DeepSpeed's fp32 master partitions. Collective under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    expected = {name for layer in engine.pm.layers for name, _ in layer.full_named_parameters()}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"model state: missing key(s) {', '.join(missing[:5])}")
    if engine.layout.pp == 1:
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise ValueError(f"model state: unexpected key(s) {', '.join(unexpected[:5])}")
    with torch.no_grad():
        for layer in engine.pm.layers:
            for name, p in layer.full_named_parameters():
                shard = shard_of(state[name], p, engine.layout.tp, engine.tp_rank).float().to(engine.device)
                if engine.layout.zero_stage == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(shard.reshape(p.shape).to(p.dtype))
                else:
                    p.data.copy_(shard.to(p.dtype))
                if engine.layout.zero_stage > 0 or engine.precision == "bf16":
                    safe_set_full_fp32_param(p, shard)


# ----- layout-independent optimizer state (resharding) ----------------------------------------
def local_optimizer_state(engine, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    """This TP shard's fp32 AdamW state ``key``, complete over ZeRO partitions (collective
    over DP under ZeRO)."""
    if internals.has_zero_fragment(p):
        from deepspeed.utils import safe_get_full_optimizer_state

        full = safe_get_full_optimizer_state(p, key)
        return full.detach().float().reshape(internals.unpartitioned_shape(p))
    return internals.base_optimizer(engine.engine).state[p][key].detach().float().clone()


def full_optimizer_state(engine, only_rank0: bool = False) -> dict[str, torch.Tensor]:
    """AdamW state in the layout-independent format of ``LocalEngine.full_optimizer_state``,
    on every rank (or only on global rank 0 with ``only_rank0``; the others get ``{}``): ``NAME::exp_avg`` / ``NAME::exp_avg_sq`` (full fp32 tensors on CPU, TP
    shards gathered, ZeRO partitions and pipeline stages merged; LLaDA names as in
    :func:`model_state_dict`) and ``::step`` (0-d int64). Collective: every rank calls it."""
    internals.ensure_optimizer_state(engine.engine)
    state = gather_full(
        engine,
        lambda name, p: [(f"{name}::{key}", local_optimizer_state(engine, p, key)) for key in ("exp_avg", "exp_avg_sq")],
        only_rank0,
    )
    step = torch.tensor(internals.optimizer_step_count(engine.engine), dtype=torch.int64, device=engine.device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    if not only_rank0 or dist.get_rank() == 0:
        state["::step"] = step.cpu()
    return state


def load_full_optimizer_state(engine, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`full_optimizer_state`'s format (written by any layout or by LocalEngine):
    each rank slices its TP shard of every moment and writes it into DeepSpeed's fp32
    partitions (``safe_set_full_optimizer_state``) or the plain AdamW state (ZeRO-0 fp32),
    and sets every AdamW step counter (and DeepSpeed's ``global_steps``) to ``::step``.
    Load the weights with :func:`load_model_state_dict` as well."""
    from deepspeed.utils import safe_set_full_optimizer_state

    named = [(n, p) for layer in engine.pm.layers for n, p in layer.full_named_parameters()]
    wanted = ["::step"] + [f"{n}::{k}" for n, _ in named for k in ("exp_avg", "exp_avg_sq")]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"optimizer state: missing key(s) {', '.join(missing[:5])}")
    internals.ensure_optimizer_state(engine.engine)
    base = internals.base_optimizer(engine.engine)
    with torch.no_grad():
        for name, p in named:
            for key in ("exp_avg", "exp_avg_sq"):
                full = state[f"{name}::{key}"]
                zero3 = internals.is_zero3_param(p)
                shape = internals.unpartitioned_shape(p) if zero3 else full_shape(p, engine.layout.tp)
                if tuple(full.shape) != tuple(shape) and not zero3:
                    raise ValueError(
                        f"optimizer state: {name}::{key} has shape {tuple(full.shape)}, the model {tuple(shape)}"
                    )
                shard = shard_of(full, p, engine.layout.tp, engine.tp_rank).float().to(engine.device)
                if internals.has_zero_fragment(p):
                    safe_set_full_optimizer_state(p, shard, key)
                else:
                    base.state[p][key].copy_(shard.reshape(base.state[p][key].shape))
    internals.set_optimizer_step(engine.engine, int(state["::step"]))


# ----- checkpoints (train.checkpoint): this rank's chunks of the full tensors ------------------
def tp_base(engine, p, local_shape) -> tuple[int, ...]:
    """Offset of this rank's TP shard of ``p`` in the full tensor."""
    base = [0] * len(local_shape)
    dim = internals.tp_partition_dim(p)
    if dim is not None and engine.layout.tp > 1:
        base[dim] = engine.tp_rank * local_shape[dim]
    return tuple(base)


def fp32_pieces(engine, p, moments: bool = True) -> tuple[int, tuple[int, ...], torch.Tensor | None, dict]:
    """``(start, local shape, fp32 master view, {moment: view})`` of the part of ``p`` this
    rank owns: a 1-D range starting at element ``start`` of the flattened TP shard under
    ZeRO-1/2/3 and bf16 (DeepSpeed's fp32 partition), or the whole TP shard (ZeRO-0 fp32).
    Views of the live tensors (``None`` when this rank owns no part of ``p``)."""
    keys = ("exp_avg", "exp_avg_sq") if moments else ()
    pieces = internals.zero_fp32_fragment(p, keys)
    if pieces is not None:
        return pieces
    st = internals.base_optimizer(engine.engine).state.get(p, {})
    return 0, tuple(p.shape), p.data.view(-1), {k: st[k].view(-1) for k in keys if k in st}


def checkpoint_state(engine, optimizer: bool = True) -> dict:
    """This rank's part of the checkpoint (``train.checkpoint``'s keys): for every parameter of
    its stage, the chunks of the full fp32 weight and AdamW moments it owns, as views of the
    live tensors (a save reads them; a load writes into them, then call
    :func:`finish_checkpoint_load`). DP replicas describe equal chunks (DCP writes one)."""
    from train.checkpoint import MODEL_PREFIX, OPTIM_PREFIX, OPTIM_STEP, Sharded, fragment_chunks

    if optimizer:
        internals.ensure_optimizer_state(engine.engine)
    state: dict = {}
    for layer in engine.pm.layers:
        for name, p in layer.full_named_parameters():
            start, local_shape, master, moments = fp32_pieces(engine, p, moments=optimizer)
            base = tp_base(engine, p, local_shape)
            size = list(local_shape)
            dim = internals.tp_partition_dim(p)
            if dim is not None and engine.layout.tp > 1:
                size[dim] *= engine.layout.tp
            size = tuple(size)
            pieces = {MODEL_PREFIX + name: master}
            if optimizer:
                pieces.update({f"{OPTIM_PREFIX}{name}/{k}": moments.get(k) for k in ("exp_avg", "exp_avg_sq")})
            for key, flat in pieces.items():
                chunks = [] if flat is None else fragment_chunks(flat, local_shape, start, base)
                state[key] = Sharded(size, torch.float32, chunks)
    if optimizer:
        step = torch.tensor(internals.optimizer_step_count(engine.engine), dtype=torch.int64, device=engine.device)
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        state[OPTIM_STEP] = step.cpu()
    return state


def finish_checkpoint_load(engine, state: dict) -> None:
    """After ``train.checkpoint.load_state`` filled :func:`checkpoint_state`'s views: bring
    the working weights up to date from the fp32 masters (ZeRO-1/2/bf16: DeepSpeed's
    ``update_lp_params``, an all-gather over DP; ZeRO-3: this rank's partition) and set every
    AdamW step counter (and DeepSpeed's ``global_steps``) to the loaded ``optim/step``.
    Collective under ZeRO-1/2 and bf16."""
    from train.checkpoint import OPTIM_STEP

    params = [p for layer in engine.pm.layers for _, p in layer.full_named_parameters()]
    internals.refresh_working_weights(engine.engine, params)
    if OPTIM_STEP in state:
        internals.set_optimizer_step(engine.engine, int(state[OPTIM_STEP]))

