"""The parallel layout: tensor (TP), pipeline (PP) and data (DP) parallelism plus the ZeRO stage.

``ParallelConfig`` is the user-facing part of the run config (``parallel.*`` keys); ``ParallelLayout``
checks it against the world size, the model and the batch sizes at start, with one clear error
line per problem, and builds the process groups through megatron-core's ``parallel_state``.

Rank order (megatron-core's default ``tp-dp-pp``; DeepSpeed's pipeline topology ``pipe, data,
model`` is the same): ``rank = pp_rank·(dp·tp) + dp_rank·tp + tp_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from model.config import ModelConfig

PP_SCHEDULES = ("1f1b", "interleaved")


@dataclass
class ParallelConfig:
    """``parallel.*`` keys. Data parallelism is what is left: ``dp = world_size / (tp·pp)``."""

    tp: int = 1  # tensor-parallel size (megatron-core column/row-parallel layers)
    pp: int = 1  # pipeline stages (DeepSpeed PipelineModule, 1F1B)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (2 and 3 need pp=1)
    pp_schedule: str = "1f1b"  # "1f1b"; "interleaved" is rejected (DeepSpeed's pipe engine is 1F1B)
    virtual_stages: int = 1  # model chunks per pipeline rank (only 1 is supported)
    pp_split: Optional[list[int]] = None  # transformer blocks per stage, e.g. [3, 5]; default even
    sequence_parallel: bool = False  # megatron sequence parallelism (needs tp > 1; meant for GPU)


@dataclass
class ParallelLayout:
    """A validated layout. Build with :meth:`from_config`; fields are plain ints."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    world_size: int
    micro_batch_size: int
    global_batch_size: int
    stage_blocks: list[int] = field(default_factory=list)  # transformer blocks per pipeline stage
    sequence_parallel: bool = False

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def is_trivial(self) -> bool:
        return self.world_size == 1 and self.zero_stage == 0

    @classmethod
    def from_config(
        cls,
        config: ParallelConfig,
        world_size: int,
        model: ModelConfig,
        micro_batch_size: int,
        global_batch_size: int,
    ) -> "ParallelLayout":
        """Validate ``config`` for this world size, model and batch; raises ``ValueError`` with
        one line naming the offending key."""
        tp, pp, zero = config.tp, config.pp, config.zero_stage

        def fail(message: str) -> None:
            raise ValueError(f"parallel config: {message}")

        if tp < 1 or pp < 1:
            fail(f"parallel.tp ({tp}) and parallel.pp ({pp}) must be >= 1")
        if zero not in (0, 1, 2, 3):
            fail(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero}")
        if world_size < 1 or world_size % (tp * pp):
            fail(
                f"world size {world_size} is not a multiple of parallel.tp × parallel.pp = {tp}×{pp}"
                f" = {tp * pp} (world size must equal TP·PP·DP)"
            )
        dp = world_size // (tp * pp)
        if config.pp_schedule not in PP_SCHEDULES:
            fail(f"parallel.pp_schedule must be one of {PP_SCHEDULES}, got {config.pp_schedule!r}")
        if config.pp_schedule == "interleaved" or config.virtual_stages != 1:
            fail(
                "parallel.pp_schedule=interleaved / parallel.virtual_stages>1 is not supported: the "
                "DeepSpeed pipeline engine runs 1F1B only; use pp_schedule=1f1b, virtual_stages=1"
            )
        for name, size in (
            ("n_heads", model.n_heads),
            ("n_kv_heads", model.n_kv_heads),
            ("embedding_size", model.embedding_size),
            ("mlp_hidden_size", model.mlp_hidden_size),
        ):
            if size % tp:
                fail(f"parallel.tp ({tp}) must divide the model's {name} ({size})")
        if config.pp_split is not None:
            split = [int(n) for n in config.pp_split]
            if len(split) != pp or any(n < 1 for n in split) or sum(split) != model.n_layers:
                fail(
                    f"parallel.pp_split {split} must list {pp} positive block counts summing to "
                    f"n_layers ({model.n_layers})"
                )
        else:
            if model.n_layers % pp:
                fail(
                    f"parallel.pp ({pp}) does not divide n_layers ({model.n_layers}); give "
                    f"parallel.pp_split (blocks per stage)"
                )
            split = [model.n_layers // pp] * pp
        if pp > 1 and zero in (2, 3):
            fail(
                f"parallel.zero_stage={zero} cannot combine with pipeline parallelism (pp={pp}): "
                "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only"
            )
        if config.sequence_parallel and tp == 1:
            fail("parallel.sequence_parallel=true needs parallel.tp > 1")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp):
            fail(
                f"global batch {global_batch_size} is not divisible by micro_batch_size × dp = "
                f"{micro_batch_size}×{dp} = {micro_batch_size * dp}"
            )
        return cls(
            tp=tp,
            pp=pp,
            dp=dp,
            zero_stage=zero,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            stage_blocks=split,
            sequence_parallel=bool(config.sequence_parallel),
        )

    # ----- ranks --------------------------------------------------------------------------------
    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank (megatron's tp-dp-pp order)."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def stage_boundaries(self) -> list[int]:
        """DeepSpeed pipeline partition over the layer list ``[embedding, block_0..block_{L-1},
        head]``: stage i owns layers ``[b[i], b[i+1])``; the embedding joins the first stage and
        the head the last. Length ``pp + 1``."""
        bounds = [0]
        for i, n in enumerate(self.stage_blocks):
            bounds.append(bounds[-1] + n + (1 if i == 0 else 0))
        bounds[-1] += 1  # the head
        return bounds

    def initialize_process_groups(self, timeout_s: float | None = None) -> None:
        """Create megatron-core's TP/PP/DP groups (needs ``torch.distributed`` initialized) and
        check that they agree with :meth:`coordinates`. Re-initializes if groups exist.
        ``timeout_s``: how long a collective on these groups may wait (megatron's default: 30 min)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"parallel config: layout is for {self.world_size} ranks but torch.distributed "
                f"has {dist.get_world_size()}"
            )
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        extra = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60.0}
        # no separate gloo groups: every group inherits the default group's device map
        # (``cpu:gloo,cuda:nccl`` on GPUs), which already serves CPU tensors
        extra["create_gloo_process_groups"] = False
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp, **extra
        )
        mine = (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
        )
        expected = self.coordinates(dist.get_rank())
        if mine != expected:
            raise RuntimeError(f"megatron rank layout {mine} differs from the expected {expected}")


class MegatronMPU:
    """The ``mpu=`` adapter DeepSpeed expects, backed by megatron-core ``parallel_state`` (PP=1
    engines: the model-parallel group is the TP group)."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self._ps().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps().get_pipeline_model_parallel_world_size()
