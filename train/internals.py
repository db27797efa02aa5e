"""Every use of a private (underscore, undocumented or internal-module) DeepSpeed, megatron-core or
torch API in difftron, each with a one-line reason and the version it was checked on.

An upgrade of deepspeed (checked: 0.19.8), megatron-core (0.16.1) or torch (2.13; the c10d
defaults since 2.11) must re-check exactly this file (and run the parity, reshard, guard and
checkpoint suites). Code elsewhere calls the functions here instead of touching the internals
itself. A few touch points must stay where they are, because they are one unit with the code
around them; they are listed here (``STAYS_IN_PLACE``) with the same reason-and-version line.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch

# Touch points that stay in their module (one unit with the code around them). Each: where, what,
# why, checked on.
STAYS_IN_PLACE = (
    ("train/cpu_shim.py", "torch.cuda.current_device/synchronize/get_rng_state/manual_seed replaced",
     "megatron-core allocates buffers and seeds through torch.cuda; on a CPU-only machine they must "
     "answer for the CPU (a patch set applied as one unit)", "megatron-core 0.16.1, torch 2.13"),
    ("train/checkpoint.py", "FileSystemReader._slice_file overridden",
     "the one hook where DCP's reader holds a stored chunk's bytes: their CRC-32 is checked there",
     "torch 2.13"),
    ("train/checkpoint.py", "FileSystemReader.read_metadata overridden: sets Metadata.storage_meta.load_id "
     "and planner_data",
     "the metadata is read with a restricted unpickler, so the fields DCP's own reader fills in are "
     "filled in the same way", "torch 2.13"),
    ("train/checkpoint.py", "DCP .metadata unpickled with classes from torch.distributed.checkpoint.metadata",
     "the metadata is a pickle; only DCP's own (internal-module) classes are admitted", "torch 2.13"),
    ("train/checkpoint.py", "WriteResult.storage_data carries (storage info, CRC-32) between write_data and finish",
     "each rank's chunk CRCs reach the coordinator through DCP's own result gathering", "torch 2.13"),
    ("tools/benchmarks/collectives.py", "torch.distributed.distributed_c10d functions and deepspeed.comm.comm.cdb "
     "replaced; torch.utils._python_dispatch.TorchDispatchMode",
     "counts every collective a training step issues (benchmark instrumentation only)",
     "deepspeed 0.19.8, torch 2.13"),
)


# ----- torch --------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_group_timeouts(timeout_s: float):
    """Process groups created inside get ``timeout_s`` as their timeout.

    Why: DeepSpeed's pipeline topology calls ``dist.new_group(ranks)`` without a timeout, which
    takes ``torch.distributed.distributed_c10d.default_pg_timeout`` / ``default_pg_nccl_timeout``
    (module globals, not API; present in torch 2.11-2.13). Checked on torch 2.13; a no-op when the
    globals are missing."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    names = [n for n in ("default_pg_timeout", "default_pg_nccl_timeout") if hasattr(c10d, n)]
    saved = {n: getattr(c10d, n) for n in names}
    try:
        for n in names:
            if saved[n] is not None:
                setattr(c10d, n, timedelta(seconds=timeout_s))
        yield
    finally:
        for n, v in saved.items():
            setattr(c10d, n, v)


def dcp_write_items(fqn: str, obj) -> list:
    """DCP's write items for a plain tensor or object of a state dict.

    Why: a custom ``SavePlanner`` that plans chunks itself still wants DCP's planning for the
    other values; ``planner_helpers._create_write_items`` is that function (private). torch 2.13."""
    from torch.distributed.checkpoint.planner_helpers import _create_write_items

    return _create_write_items(fqn, obj)


def dcp_read_items(fqn: str, metadata, obj) -> list:
    """DCP's read items for a plain tensor or object of a state dict.

    Why: as :func:`dcp_write_items`, for the ``LoadPlanner`` (``planner_helpers._create_read_items``,
    private). torch 2.13."""
    from torch.distributed.checkpoint.planner_helpers import _create_read_items

    return _create_read_items(fqn, metadata, obj)


# ----- megatron-core ------------------------------------------------------------------------------
def cpu_rng_state_setter() -> None:
    """megatron's RNG tracker restores states with ``torch.cuda``; on CPU, with the CPU generator.

    Why: ``megatron.core.tensor_parallel.random._set_cuda_rng_state`` (private) is what the
    tracker calls; replacing it is the only way to run the tracker without CUDA. megatron-core
    0.16.1."""
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def tp_partition_dim(p) -> int | None:
    """The dimension along which megatron-core split ``p`` over the TP ranks; None when every TP
    rank holds it whole.

    Why: megatron's parallel layers mark their weights with ``tensor_model_parallel`` and
    ``partition_dim`` (``tensor_parallel.layers.set_tensor_model_parallel_attributes``), a
    convention, not an API. megatron-core 0.16.1."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


# ----- DeepSpeed: the engine's optimizer ------------------------------------------------------------
def base_optimizer(ds_engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrapper: the client optimizer itself (ZeRO-0 fp32) or
    the one stepping the flat fp32 partitions (ZeRO-1/2/3, bf16).

    Why: the wrappers keep it in ``.optimizer``, undocumented. deepspeed 0.19.8."""
    opt = ds_engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def gate_optimizer_step(ds_engine, before_step) -> None:
    """Call ``before_step()`` before each AdamW update; when it returns True the update is skipped
    (weights, moments and AdamW's step count stay).

    Why: the wrapped torch optimizer's ``step`` is the one call every DeepSpeed path (ZeRO-0/1/2/3,
    bf16, the pipeline schedule) makes after reducing the gradients and computing the grad norm
    and before any weight changes; DeepSpeed has no hook there. deepspeed 0.19.8."""
    base = base_optimizer(ds_engine)
    original = base.step

    def gated_step(*args, **kwargs):
        if before_step():
            return None
        return original(*args, **kwargs)

    base.step = gated_step  # called per parameter group / ZeRO sub-group


def global_grad_norm(ds_engine) -> float:
    """The global grad norm DeepSpeed computed for the running step (before its clipping).

    Why: inside the step (before ``get_global_grad_norm`` is updated) it is only in the
    wrapper's ``_global_grad_norm``, or, ZeRO-0 fp32, the engine's ``_global_grad_norm`` (set by
    ``train.parallelize``'s model-parallel clipping). deepspeed 0.19.8."""
    opt = ds_engine.optimizer
    norm = None if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "_global_grad_norm", None)
    if norm is None:
        norm = ds_engine._global_grad_norm
    return float("nan") if norm is None else float(norm)


def ensure_optimizer_state(ds_engine) -> None:
    """Create AdamW's state (step 0, zero moments: what its first step would create) where it
    does not exist yet, and (re)link DeepSpeed's per-parameter views of the flat ZeRO partitions'
    state, so it can be read or written before the first step.

    Why: ZeRO-3 keeps its flat fp32 sub-groups in ``fp32_partitioned_groups_flat`` and ZeRO-1/2
    links the views lazily (``_lazy_init_hp_params_optimizer_state``, guarded by
    ``_hp_optimizer_states_linked``); all private. deepspeed 0.19.8."""
    base = base_optimizer(ds_engine)
    wrapper = ds_engine.optimizer
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


def optimizer_step_count(ds_engine) -> int:
    """AdamW's step count on this rank (the largest over its parameter groups; 0 before any).

    Why: read from the torch AdamW under DeepSpeed's wrapper (:func:`base_optimizer`); DeepSpeed
    has no accessor for it. deepspeed 0.19.8."""
    steps = [int(st["step"]) for st in base_optimizer(ds_engine).state.values() if "step" in st]
    return max(steps, default=0)


def set_optimizer_step(ds_engine, step: int) -> None:
    """Set every AdamW step counter and DeepSpeed's own step count to ``step`` (after a load).

    Why: the engine's ``global_steps`` is a plain attribute with no setter. deepspeed 0.19.8."""
    for st in base_optimizer(ds_engine).state.values():
        st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
    ds_engine.global_steps = step


# ----- DeepSpeed: parameters and their ZeRO partitions -----------------------------------------------
def is_zero3_param(p) -> bool:
    """A parameter partitioned by ZeRO-3.

    Why: only the attribute ``ds_id`` (set by ``deepspeed.zero.Init``) tells. deepspeed 0.19.8."""
    return hasattr(p, "ds_id")


def has_zero_fragment(p) -> bool:
    """A parameter whose fp32 master lives in a DeepSpeed partition (ZeRO-3, or ZeRO-1/2 and bf16).

    Why: only ``ds_id`` or the private ``_hp_mapping`` tell. deepspeed 0.19.8."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def unpartitioned_shape(p) -> tuple[int, ...]:
    """The unpartitioned shape of a parameter.

    Why: under ZeRO-3 ``p.shape`` is empty; the full shape is the undocumented ``ds_shape``.
    deepspeed 0.19.8."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def zero_fp32_fragment(p, keys) -> tuple[int, tuple[int, ...], torch.Tensor | None, dict] | None:
    """``(start, local shape, fp32 master view, {moment: view})`` of the part of ``p`` this rank
    owns under ZeRO (a 1-D range starting at element ``start`` of the flattened TP shard), or
    None when ``p`` is not partitioned (ZeRO-0 fp32). ``master`` is None when this rank owns no
    part of ``p``.

    Why: ZeRO-3's partition numbers (``partition_numel``, ``ds_process_group``, ``ds_numel``) and
    ZeRO-1/2's fragment mapping (``_hp_mapping``: ``lp_fragment_address``, ``get_hp_fragment``,
    ``optim_fragment``, ``get_optim_state_fragment``) are internals; the public ``safe_get_*``
    give copies, not the live views a checkpoint load writes into. deepspeed 0.19.8."""
    import torch.distributed as dist

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
    return None


def refresh_working_weights(ds_engine, params) -> None:
    """After the fp32 masters were written: bring the working weights up to date (ZeRO-3: this
    rank's partition ``ds_tensor``; ZeRO-1/2 and bf16: ``update_lp_params``, an all-gather over DP).

    Why: DeepSpeed only copies masters to working weights inside its own step; ``ds_tensor`` and
    ``update_lp_params`` are internals. deepspeed 0.19.8."""
    with torch.no_grad():
        if any(hasattr(p, "ds_id") for p in params):
            for p in params:
                _, _, master, _ = zero_fp32_fragment(p, ())
                p.ds_tensor.data.view(-1).narrow(0, 0, master.numel()).copy_(master)
        elif any(hasattr(p, "_hp_mapping") for p in params):
            ds_engine.optimizer.update_lp_params()


def skip_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-builds ``deepspeed_shm_comm`` at ``init_distributed`` (20+ s);
    skip it (gloo serves the CPU).

    Why: ``deepspeed.comm.torch.build_shm_op`` is module-internal (and ``deepspeed.comm.torch`` as
    an attribute is the torch module, hence ``sys.modules``). deepspeed 0.19.8."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# ----- DeepSpeed: building the engine ---------------------------------------------------------------
@contextlib.contextmanager
def zero1_bf16_with_fp32_accumulation():
    """Inside this block, ``deepspeed.initialize`` builds ``DeepSpeedZeroOptimizer`` (stage 1) for
    bf16 weights with fp32 gradient accumulation instead of ``BF16_Optimizer``.

    Why: DeepSpeed 0.19.8's ``DeepSpeedEngine._do_optimizer_sanity_check`` sends bf16 + ZeRO-1 +
    ``grad_accum_dtype=fp32`` to ``BF16_Optimizer``, which all-reduces the whole fp32 gradient
    buffer after the backward pass (2x the bytes of a reduce-scatter, nothing overlapped).
    ``DeepSpeedZeroOptimizer`` supports exactly this mode itself (stage 1 keeps an fp32
    ``param.grad_accum`` per parameter when the weights' dtype differs from
    ``gradient_accumulation_dtype``) and, with ``overlap_comm``, reduces the gradients bucket by
    bucket to their partition owners during the last micro-batch's backward. The engine's choice
    is the only obstacle, so only that return value is changed, only inside this block, and only
    for configs that ask for a reduce-scatter of the gradients (``zero_optimization.reduce_scatter``
    with ``use_multi_rank_bucket_allreduce: false``, which ``train.parallelize.deepspeed_config``
    sets; BF16_Optimizer cannot reduce-scatter, and other configs keep it)."""
    from deepspeed.runtime.constants import BFLOAT16
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    original = DeepSpeedEngine._do_optimizer_sanity_check

    def check(self, basic_optimizer):
        wrapper = original(self, basic_optimizer)
        if (
            wrapper == BFLOAT16 and self.zero_optimization() and self.zero_optimization_stage() == 1
            and self.zero_reduce_scatter() and not self.zero_multi_rank_bucket_allreduce()
        ):
            return ZERO_OPTIMIZATION
        return wrapper

    DeepSpeedEngine._do_optimizer_sanity_check = check
    try:
        yield
    finally:
        DeepSpeedEngine._do_optimizer_sanity_check = original


# --- DeepSpeed (train.parallelize) -----------------------------------------------------------------
def deepspeed_pipeline_module(layers, loss_fn, topology, boundaries: list[int]):
    """A DeepSpeed ``PipelineModule`` of ``layers`` (``LayerSpec``s) whose stage ``k`` holds
    layers ``boundaries[k]:boundaries[k+1]``, and that stays on the meta device when built there.

    Why: ``PipelineModule`` offers only its own partition methods (uniform/parameters/type), not
    given boundaries; the override of ``_partition_layers`` sets ``parts`` and calls
    ``_set_bounds`` with the stage from ``_topo`` as the base class does (checked: deepspeed
    0.19.8). Its ``__init__`` also moves the stage with ``.to(device)``, which a meta-device stage
    skips (``train.parallelize.build_stage`` allocates it itself)."""
    from deepspeed.pipe import PipelineModule

    class BoundedPipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = list(boundaries)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def to(self, *args, **kwargs):
            if any(p.is_meta for p in self.parameters()):
                return self
            return super().to(*args, **kwargs)

    return BoundedPipeline(layers=layers, loss_fn=loss_fn, topology=topology, partition_method="uniform")


def replace_fp32_gradient_clipping(engine, clip) -> None:
    """Make DeepSpeed's ZeRO-0 fp32 path call ``clip()`` instead of its own clipping;
    ``clip()`` returns the global gradient norm, which the engine then reports.

    Why: that path clips in ``DeepSpeedEngine.clip_fp32_gradients`` with
    ``runtime.utils.clip_grad_norm_(mpu=...)``, whose model-parallel group under a
    PipelineModule leaves replicated parameters of stages > 0 out of the norm, and it never
    records the norm (``get_global_grad_norm`` reads ``_global_grad_norm``). Checked: deepspeed 0.19.8."""

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = float(clip())

    engine.clip_fp32_gradients = clip_fp32_gradients


# --- megatron-core (train.parallelize) -------------------------------------------------------------
def mark_tensor_parallel(weight, dim: int) -> None:
    """Mark ``weight`` as split over the TP group along ``dim`` (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``).

    Why: megatron's layers set these attributes only when they initialize the weights
    themselves (``perform_initialization``); ours are copied in from full tensors, and shard
    cutting, gathering and DeepSpeed's model-parallel norms read them. Checked: megatron-core 0.16.1."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(weight, True, dim, 1)


# --- torch (train.parallelize) ---------------------------------------------------------------------
def materialize_meta(module, device) -> None:
    """Allocate a meta-device module's parameters and buffers on ``device`` (uninitialized).

    Why: ``Module.to_empty`` makes new Parameters and drops the attributes megatron and
    :func:`mark_tensor_parallel` set on them; writing ``_parameters``/``_buffers`` keeps the
    same Parameter ``__dict__``. Checked: torch 2.13."""
    import torch
    import torch.nn as nn

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                m._parameters[name] = new
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)
