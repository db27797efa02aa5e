"""Every use of a private (underscore, undocumented or internal-module) DeepSpeed, megatron-core or
torch API in difftron, each with a one-line reason and the version it was checked on.

An upgrade of deepspeed (checked: 0.19.8), megatron-core (0.16.1) or torch (2.11-2.13) must
re-check exactly this file (and run the parity, guard and checkpoint suites). Code elsewhere calls
the functions here instead of touching the internals itself.
"""

from __future__ import annotations

import contextlib


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
