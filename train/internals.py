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
