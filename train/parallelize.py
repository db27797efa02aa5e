"""Apply a :class:`~train.layout.ParallelLayout` to LLaDA: TP layers, pipeline stages, checkpointing,
and the DeepSpeed engine (ZeRO, clipping, bf16 with fp32 masters).

The single-device model (``model.llada``) is the source of truth for the math and the names. Here
the model becomes a flat list ``[embedding, block_0 .. block_{L-1}, head]`` in which

- each block is ``model.llada.LLaDABlock`` itself (``TransformerLayer``), built with
  :func:`tensor_parallel_linear` as its projection factory: ``q_proj``/``k_proj``/``v_proj``/
  ``ff_proj``/``up_proj`` are megatron-core ``ColumnParallelLinear`` (each rank owns whole heads /
  a slice of the SwiGLU width), ``attn_out``/``ff_out`` are ``RowParallelLinear``; norms, RoPE,
  attention (flash-attn on GPU when installed, SDPA otherwise), residuals, SwiGLU and activation
  checkpointing are the block's own code;
- ``wte`` is ``VocabParallelEmbedding`` and the head is ``model.llada.lm_head`` with a
  column-parallel projection whose vocab-sharded logits go straight into
  ``model.objective.masked_token_losses`` with megatron's ``vocab_parallel_cross_entropy`` at the
  masked positions (full-vocabulary logits are never gathered in training);
- activations between layers are ``[s, b, d]`` (megatron's layout; sequence parallelism splits
  ``s`` across the TP group).

Every layer knows its single-device name prefix, so each parameter maps to one LLaDA name
(``transformer.blocks.3.q_proj.weight``) and its shard is cut from the full tensor along
``partition_dim``. The full tensors come from a built ``LLaDAModel`` or are drawn exactly as
``model.llada.init_weights`` draws them (seeded by ``(seed, crc32(name))``), one at a time, on the
target device; the layers themselves are built on the meta device and allocated there once, in
the training dtype.

Pipeline parallelism uses DeepSpeed's ``PipelineModule`` (1F1B) with a topology that mirrors
megatron's rank order; PP=1 uses a plain ``DeepSpeedEngine`` with megatron's groups given through
``mpu=``. The optimizer is ``train.local_engine.build_optimizer``'s AdamW (the same as one
process). Private DeepSpeed/megatron/torch touches are functions in ``train.internals``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from model.config import ModelConfig
from model.llada import CHECKPOINTING_MODES, LLaDABlock, LLaDAModel, RMSNorm, init_tensor, lm_head
from model.objective import masked_token_losses, weighted_loss
from train.internals import (
    deepspeed_pipeline_module,
    mark_tensor_parallel,
    materialize_meta,
    replace_fp32_gradient_clipping,
    zero1_bf16_with_fp32_accumulation,
)
from train.local_engine import build_optimizer
from train.layout import MegatronMPU, ParallelLayout

NO_CLIP = 1e30  # a clipping threshold that never clips (DeepSpeed computes norms only when > 0)


@dataclass
class LayerOptions:
    """What every parallel layer constructor needs (passed through DeepSpeed ``LayerSpec``)."""

    model: ModelConfig
    tp: int
    sequence_parallel: bool
    activation_checkpointing: str
    attention_backend: str
    use_cpu_initialization: bool
    params_dtype: torch.dtype = torch.float32

    def tp_config(self):
        from megatron.core import ModelParallelConfig

        return ModelParallelConfig(
            tensor_model_parallel_size=self.tp,
            sequence_parallel=self.sequence_parallel,
            use_cpu_initialization=self.use_cpu_initialization,
            perform_initialization=False,  # weights are copied in from the full tensors
            params_dtype=self.params_dtype,
            gradient_accumulation_fusion=False,
        )


def _no_init(weight: torch.Tensor) -> None:
    return None


@functools.cache
def _tensor_parallel_linears() -> tuple[type, type]:
    """megatron-core's column/row-parallel linears, with ``forward`` returning the output tensor
    (megatron's return ``(output, bias)``), as ``LLaDABlock``'s projections expect."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class RowLinear(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return ColumnLinear, RowLinear


def tensor_parallel_linear(opts: LayerOptions) -> Callable[[int, int, str], nn.Module]:
    """The projection factory of ``model.llada.LLaDABlock`` (and the head) under TP: ``column``
    projections split their output features over the TP group (no gather: each rank keeps whole
    heads / a slice of the SwiGLU width, or the sequence-gathered input under sequence
    parallelism), ``row`` projections split their input features and reduce (reduce-scatter
    under sequence parallelism). No biases; the weights are filled from the full tensors later."""
    cfg = opts.tp_config()
    column, row = _tensor_parallel_linears()

    def linear(n_in: int, n_out: int, kind: str) -> nn.Module:
        if kind == "column":
            layer = column(n_in, n_out, config=cfg, init_method=_no_init, bias=False, gather_output=False)
        elif kind == "row":
            layer = row(n_in, n_out, config=cfg, init_method=_no_init, bias=False, input_is_parallel=True,
                        skip_bias_add=False)
        else:
            raise ValueError(f"linear kind must be 'column' or 'row', got {kind!r}")
        mark_tensor_parallel(layer.weight, 0 if kind == "column" else 1)
        return layer

    return linear


class ParallelLayer(nn.Module):
    """A layer of the flat list; ``prefix`` + local parameter name = the single-device name."""

    prefix: str = ""

    def full_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            yield self.prefix + name, p


class EmbeddingLayer(ParallelLayer):
    """``input_ids [b, s]`` -> hidden ``[s, b, d]`` (``[s/tp, b, d]`` under sequence parallelism)."""

    def __init__(self, opts: LayerOptions) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        self.prefix = "transformer."
        self.sequence_parallel = opts.sequence_parallel
        self.wte = VocabParallelEmbedding(
            opts.model.embedding_size, opts.model.d_model, init_method=_no_init, config=opts.tp_config()
        )
        mark_tensor_parallel(self.wte.weight, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids).transpose(0, 1).contiguous()
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            x = scatter_to_sequence_parallel_region(x)
        return x


class TransformerLayer(LLaDABlock, ParallelLayer):
    """``model.llada.LLaDABlock`` with megatron's TP projections over ``[s, b, d]``: this rank's
    heads and SwiGLU slice; RMSNorm and silu·up are recomputed in backward (same numbers, less
    activation memory; ``tools/plan.py`` counts it)."""

    def __init__(self, opts: LayerOptions, index: int) -> None:
        super().__init__(opts.model, linear=tensor_parallel_linear(opts), shards=opts.tp, sequence_first=True)
        self.prefix = f"transformer.blocks.{index}."
        self.checkpointing, self.attention_backend = opts.activation_checkpointing, opts.attention_backend
        self.recompute_elementwise = True


class HeadLayer(ParallelLayer):
    """``model.llada.lm_head`` with a column-parallel projection: ``[s(/tp), b, d]`` -> logits
    ``[s, b, V/tp]`` (RMSNorm recomputed in backward)."""

    def __init__(self, opts: LayerOptions) -> None:
        super().__init__()
        c = opts.model
        self.prefix = "transformer."
        self.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_out = tensor_parallel_linear(opts)(c.d_model, c.embedding_size, "column")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lm_head(self.ln_f, self.ff_out, x, recompute_norm=True)


class LayerStack(nn.Module):
    """The PP=1 model: the flat layer list applied in order (``input_ids [b, s]`` -> logits)."""

    def __init__(self, layers: list[ParallelLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids
        for layer in self.layers:
            x = layer(x)
        return x


# ----- loss -------------------------------------------------------------------------------------
class MaskedDiffusionLoss:
    """The loss function of the last stage: ``(logits, (targets, masked, p_mask, row_weight))`` ->
    ``scale · Σ_rows row_weight · per_sample``. It records the unscaled loss and per-sample sums
    of every call, so the engine can report them (DeepSpeed's pipe engine keeps only a mean).

    ``scale`` compensates DeepSpeed's averaging: the engine divides the loss by the accumulation
    steps and averages gradients over DP, while our row weights already carry ``1/(G·L)``.
    """

    def __init__(self) -> None:
        self.scale = 1.0
        self.losses: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def reset(self, scale: float) -> None:
        self.scale = scale
        self.losses, self.rows = [], []

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        targets, masked, p_mask, row_weight = labels
        # vocab-sharded logits [s, b, V/tp]: the softmax is reduced over the TP group at the
        # masked positions only; the full-vocabulary logits never exist
        per_sample = masked_token_losses(
            logits.transpose(0, 1), targets, masked, p_mask, cross_entropy=vocab_parallel_cross_entropy
        )
        loss = weighted_loss(per_sample, row_weight)
        self.losses.append(loss.detach().double())
        self.rows.append(per_sample.detach().float())
        return loss * self.scale


# ----- full tensors and shards ------------------------------------------------------------------
def drawn_full_tensor(
    config: ModelConfig, seed: int, device: torch.device | str = "cpu"
) -> Callable[[str, torch.Size], torch.Tensor]:
    """``(name, full_shape) -> fp32 tensor on device`` drawn as ``build_model(config, seed,
    device)`` would draw it (``model.llada.init_tensor``)."""

    def draw(name: str, shape: torch.Size) -> torch.Tensor:
        return init_tensor(name, shape, seed, config.init_std, config.n_layers, device=device)

    return draw


def full_shape(p: torch.Tensor, tp: int) -> torch.Size:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return torch.Size(shape)


def shard_of(full: torch.Tensor, p: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor (whole tensor for replicated parameters)."""
    if getattr(p, "tensor_model_parallel", False) and tp > 1:
        return full.chunk(tp, dim=p.partition_dim)[tp_rank]
    return full


def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """L2 norm of the (DP-reduced) gradients over the whole model: TP-sharded grads count on every
    TP rank, replicated ones on TP rank 0 only; summed over the TP×PP model-parallel group."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            total += p.grad.double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_model_parallel_group())
    return total.sqrt()


# ----- the one step -----------------------------------------------------------------------------
@dataclass
class ParallelModel:
    """The result of :func:`parallelize`: the DeepSpeed engine, this rank's layers, the loss."""

    engine: Any  # deepspeed DeepSpeedEngine (PP=1) or PipelineEngine (PP>1)
    layers: list[ParallelLayer]
    loss: MaskedDiffusionLoss
    layout: ParallelLayout
    device: torch.device

    @property
    def pipelined(self) -> bool:
        return self.layout.pp > 1


def _pipeline_module(specs, loss, layout: ParallelLayout):
    """DeepSpeed's ``PipelineModule`` of this rank's stage, with our stage boundaries (embedding on
    the first stage, head on the last, blocks per ``layout.stage_blocks``)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    coord = topology.get_coord(dist.get_rank())
    if (coord.pipe, coord.data, coord.model) != layout.coordinates(dist.get_rank()):
        raise RuntimeError("DeepSpeed pipeline topology disagrees with megatron's rank order")
    return deepspeed_pipeline_module(specs, loss, topology, layout.stage_boundaries())


# DeepSpeed's default bucket (5e8 elements); smaller stages get about 8 buckets per backward
MAX_BUCKET_ELEMENTS = 500_000_000


def bucket_elements(local_params: int | None) -> int:
    """Elements per gradient-reduction / parameter-all-gather bucket: DeepSpeed's default 5e8, or
    about an eighth of this rank's parameters when that is smaller (so the reduction of a small
    model is still split into buckets that go out during the backward pass). Even, >= 1000."""
    if local_params is None:
        return MAX_BUCKET_ELEMENTS
    return max(1000, min(MAX_BUCKET_ELEMENTS, -(-local_params // 8))) // 2 * 2


def deepspeed_config(
    layout: ParallelLayout, grad_clip: float, precision: str, local_params: int | None = None, *, overlap: bool = True
) -> dict:
    """The DeepSpeed config of a layout (docs/communication.md). With ``overlap`` (the default),
    ZeRO 1-3 reduce gradients bucket by bucket (``reduce_bucket_size`` = :func:`bucket_elements`
    of ``local_params``) to their partition owners (``reduce_scatter`` with
    ``use_multi_rank_bucket_allreduce=false``: one reduce per owner, not an all-reduce) and, at
    PP=1, during the backward pass (``overlap_comm``; ZeRO-1 only in the last micro-batch's).
    bf16 + ZeRO-1 keeps fp32 gradient accumulation (reduced in bf16, as before); build it inside
    ``train.internals.zero1_bf16_with_fp32_accumulation`` (DeepSpeedZeroOptimizer
    instead of BF16_Optimizer). ``overlap=False`` gives the configuration before issue 16."""
    zero: dict = {"stage": layout.zero_stage}
    config = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "gradient_clipping": grad_clip if grad_clip > 0 else NO_CLIP,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and layout.zero_stage == 1:
        # fp32 masters and fp32 gradient accumulation
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if overlap and layout.zero_stage > 0:
        bucket = bucket_elements(local_params)
        zero.update(
            contiguous_gradients=True, reduce_scatter=True, use_multi_rank_bucket_allreduce=False,
            reduce_bucket_size=bucket, allgather_bucket_size=bucket,
        )
        if layout.pp == 1:  # DeepSpeed's pipeline engine turns overlap_comm off (and warns)
            zero["overlap_comm"] = True
        if layout.zero_stage == 3:
            zero.pop("allgather_bucket_size")
            zero.update(stage3_prefetch_bucket_size=bucket)
    if layout.pp > 1:
        # activations are identical on TP peers (or sequence-sharded): send them whole
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


def build_stage(
    source: LLaDAModel | ModelConfig,
    layout: ParallelLayout,
    *,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    activation_checkpointing: str = "none",
    attention_backend: str = "auto",
    loss: MaskedDiffusionLoss | None = None,
) -> tuple[nn.Module, list[ParallelLayer]]:
    """This rank's module (a ``LayerStack``, or DeepSpeed's ``PipelineModule`` of its stage under
    PP) and its layers, with the weights of ``source`` (a built model, or drawn as
    ``build_model(config, seed, device)`` draws them) sliced to this TP rank, in ``dtype`` on
    ``device``. The layers are created on the meta device, allocated once on ``device`` in the
    training dtype and filled one full tensor at a time (drawn on ``device``): the host holds no
    copy of the model, and no fp32 stage is moved to the GPU before DeepSpeed's bf16 cast."""
    from deepspeed.pipe import LayerSpec
    from megatron.core import parallel_state as ps

    if isinstance(source, LLaDAModel):
        config, state = source.config, source.state_dict()
        full_tensor = lambda name, shape: state[name].to(device)  # noqa: E731
    else:
        config, full_tensor = source, drawn_full_tensor(source, seed, device)
    opts = LayerOptions(
        model=config,
        tp=layout.tp,
        sequence_parallel=layout.sequence_parallel,
        activation_checkpointing=activation_checkpointing,
        attention_backend=attention_backend,
        use_cpu_initialization=True,  # megatron allocates with the default device: meta below
        params_dtype=dtype,
    )
    specs = (
        [LayerSpec(EmbeddingLayer, opts)]
        + [LayerSpec(TransformerLayer, opts, i) for i in range(config.n_layers)]
        + [LayerSpec(HeadLayer, opts)]
    )
    with torch.device("meta"):
        if layout.pp > 1:
            module = _pipeline_module(specs, loss or MaskedDiffusionLoss(), layout)
            layers = [f for f in module.forward_funcs if isinstance(f, ParallelLayer)]
        else:
            layers = [spec.build() for spec in specs]
            module = LayerStack(layers)
    if dtype == torch.bfloat16:
        module.bfloat16()  # still on the meta device: costs nothing
    materialize_meta(module, device)  # keeps megatron's attributes (Module.to_empty would drop them)

    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.full_named_parameters():
                full = full_tensor(name, full_shape(p, layout.tp))
                if tuple(full.shape) != tuple(full_shape(p, layout.tp)):
                    raise ValueError(f"parameter {name}: source shape {tuple(full.shape)} does not match the model")
                p.copy_(shard_of(full, p, layout.tp, tp_rank))
                del full
    return module, layers


def parallelize(
    source: LLaDAModel | ModelConfig,
    layout: ParallelLayout,
    *,
    seed: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    grad_clip: float,
    precision: str = "fp32",
    activation_checkpointing: str = "none",
    attention_backend: str = "auto",
    device: torch.device | None = None,
) -> ParallelModel:
    """Build this rank's part of the model under ``layout`` and wrap it in a DeepSpeed engine.

    ``source`` is a built single-device ``LLaDAModel`` (its weights are sliced) or a
    ``ModelConfig`` (weights drawn as ``build_model(config, seed)`` draws them). Needs
    ``torch.distributed`` and megatron's groups (``layout.initialize_process_groups()``).
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if activation_checkpointing not in CHECKPOINTING_MODES:
        raise ValueError(
            f"activation_checkpointing must be one of {CHECKPOINTING_MODES}, got {activation_checkpointing!r}"
        )
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' for parallel runs, got {precision!r}")
    device = device or torch.device("cpu")
    loss = MaskedDiffusionLoss()
    module, layers = build_stage(
        source, layout, seed=seed, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        activation_checkpointing=activation_checkpointing, attention_backend=attention_backend,
        device=device, loss=loss,
    )
    if layout.sequence_parallel:
        _reduce_norm_grads_over_tp(layers)

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(module, lr, weight_decay, betas, eps)
    kwargs = {} if layout.pp > 1 else {"mpu": MegatronMPU()}
    ds_config = deepspeed_config(layout, grad_clip, precision, sum(p.numel() for p in params))
    with zero1_bf16_with_fp32_accumulation():
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, **kwargs)
    if layout.zero_stage == 0 and precision == "fp32":
        _use_model_parallel_clipping(engine, params, grad_clip)
    return ParallelModel(engine=engine, layers=layers, loss=loss, layout=layout, device=device)


def _use_model_parallel_clipping(engine, params: list[nn.Parameter], grad_clip: float) -> None:
    """DeepSpeed's ZeRO-0 fp32 path clips with ``runtime.utils.clip_grad_norm_(mpu=...)``; under a
    PipelineModule its "model-parallel rank" spans pipe×TP, so replicated parameters on stages > 0
    drop out of the norm (3d-parallel.md A.2), and it never records the norm. Replace it with
    :func:`global_grad_norm` + torch-style clipping, and record the norm for reporting."""

    def clip() -> torch.Tensor:
        norm = global_grad_norm(params)
        if grad_clip > 0:
            coef = grad_clip / (float(norm) + 1e-6)
            if coef < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    replace_fp32_gradient_clipping(engine, clip)


def _reduce_norm_grads_over_tp(layers: list[ParallelLayer]) -> None:
    """Under sequence parallelism each TP rank sees a slice of the sequence, so the replicated
    norm weights get partial gradients; sum them over the TP group (megatron does this in
    ``finalize_model_grads``, which DeepSpeed does not call)."""
    from megatron.core import parallel_state as ps

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad

    for layer in layers:
        if isinstance(layer, (TransformerLayer, HeadLayer)):
            for p in layer.parameters():
                if not getattr(p, "tensor_model_parallel", False):
                    p.register_hook(reduce)

