"""Apply a :class:`~train.layout.ParallelLayout` to LLaDA: TP layers, pipeline stages, checkpointing,
and the DeepSpeed engine (ZeRO, clipping, bf16 with fp32 masters).

The single-device model (``model.llada``) is the source of truth for the math and the names. Here
its layers are rebuilt as a flat list ``[embedding, block_0 .. block_{L-1}, head]`` in which

- ``q_proj``/``k_proj``/``v_proj``/``ff_proj``/``up_proj`` are megatron-core
  ``ColumnParallelLinear`` (each rank owns whole heads / a slice of the SwiGLU width),
  ``attn_out``/``ff_out`` are ``RowParallelLinear``, ``wte`` is ``VocabParallelEmbedding`` and the
  head is a column-parallel projection whose vocab-sharded logits go straight into
  ``vocab_parallel_cross_entropy`` at the masked positions (full-vocabulary logits are never
  gathered in training);
- norms, RoPE and attention reuse ``model.llada``/``model.attention`` (flash-attn on GPU when
  installed, SDPA otherwise);
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
``mpu=``. See ``.notes/parallel-readme.md`` for the reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.attention import attention
from model.config import ModelConfig
from model.llada import CHECKPOINTING_MODES, LLaDAModel, RMSNorm, apply_rope, init_tensor, rope_tables
from train.internals import zero1_bf16_with_fp32_accumulation
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


def _mark_partitioned(weight: nn.Parameter, dim: int) -> None:
    """megatron sets these attributes only when it initializes weights itself; we need them for
    shard cutting, gathering and DeepSpeed's model-parallel-aware norms."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _column(opts: LayerOptions, cfg, n_in: int, n_out: int):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    layer = ColumnParallelLinear(n_in, n_out, config=cfg, init_method=_no_init, bias=False, gather_output=False)
    _mark_partitioned(layer.weight, 0)
    return layer


def _row(opts: LayerOptions, cfg, n_in: int, n_out: int):
    from megatron.core.tensor_parallel import RowParallelLinear

    layer = RowParallelLinear(
        n_in, n_out, config=cfg, init_method=_no_init, bias=False, input_is_parallel=True, skip_bias_add=False
    )
    _mark_partitioned(layer.weight, 1)
    return layer


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
        _mark_partitioned(self.wte.weight, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids).transpose(0, 1).contiguous()
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            x = scatter_to_sequence_parallel_region(x)
        return x


class TransformerLayer(ParallelLayer):
    """One LLaDA block over ``[s, b, d]`` with this rank's heads and SwiGLU slice."""

    def __init__(self, opts: LayerOptions, index: int) -> None:
        super().__init__()
        c, tp = opts.model, opts.tp
        cfg = opts.tp_config()
        self.prefix = f"transformer.blocks.{index}."
        self.heads, self.kv_heads, self.head_dim = c.n_heads // tp, c.n_kv_heads // tp, c.head_dim
        self.rope_theta, self.tp, self.sequence_parallel = c.rope_theta, tp, opts.sequence_parallel
        self.checkpointing, self.attention_backend = opts.activation_checkpointing, opts.attention_backend
        # attribute order = LLaDABlock's, so state dicts list names in the same order
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = _column(opts, cfg, c.d_model, c.d_model)
        self.k_proj = _column(opts, cfg, c.d_model, c.kv_dim)
        self.v_proj = _column(opts, cfg, c.d_model, c.kv_dim)
        self.attn_out = _row(opts, cfg, c.d_model, c.d_model)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_proj = _column(opts, cfg, c.d_model, c.mlp_hidden_size)
        self.up_proj = _column(opts, cfg, c.d_model, c.mlp_hidden_size)
        self.ff_out = _row(opts, cfg, c.mlp_hidden_size, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)

    def _attention(self, q, k, v):
        return attention(q, k, v, None, backend=self.attention_backend)

    def _swiglu(self, m: torch.Tensor) -> torch.Tensor:
        gate, up = self.ff_proj(m)[0], self.up_proj(m)[0]
        if self._cheap_recompute():  # keep gate and up (not silu(gate) as well): -2·s·b·f/t bytes
            return checkpoint(_silu_mul, gate, up, use_reentrant=False)
        return _silu_mul(gate, up)

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        if self._cheap_recompute():  # keep the bf16 input, not RMSNorm's fp32 copies: -8·s·b·h/t bytes
            return checkpoint(norm, x, use_reentrant=False)
        return norm(x)

    def _cheap_recompute(self) -> bool:
        """Recompute the elementwise parts (RMSNorm, silu·up) in backward instead of keeping their
        intermediates: the same ops run again, so the numbers are identical. Off under full
        recomputation (nothing of the block is kept) and without autograd."""
        return self.checkpointing != "full" and torch.is_grad_enabled()

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:  # [s, b, n·hd] -> [b, n, s, hd]
        s, b = t.shape[:2]
        return t.view(s, b, n, self.head_dim).permute(1, 2, 0, 3)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        selective = self.checkpointing == "selective" and torch.is_grad_enabled()
        n = self._norm(self.attn_norm, x)
        q = self._heads(self.q_proj(n)[0], self.heads)
        k = self._heads(self.k_proj(n)[0], self.kv_heads)
        v = self._heads(self.v_proj(n)[0], self.kv_heads)
        b, s = q.shape[0], q.shape[2]
        positions = torch.arange(s, device=x.device).expand(b, s)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if selective:
            a = checkpoint(self._attention, q, k, v, use_reentrant=False)
        else:
            a = self._attention(q, k, v)
        h = x + self.attn_out(a.permute(2, 0, 1, 3).reshape(s, b, -1))[0]
        m = self._norm(self.ff_norm, h)
        g = checkpoint(self._swiglu, m, use_reentrant=False) if selective else self._swiglu(m)
        return h + self.ff_out(g)[0]


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class HeadLayer(ParallelLayer):
    """Final norm + column-parallel LM head: ``[s(/tp), b, d]`` -> logits ``[s, b, V/tp]``."""

    def __init__(self, opts: LayerOptions) -> None:
        super().__init__()
        c = opts.model
        self.prefix = "transformer."
        self.ln_f = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_out = _column(opts, opts.tp_config(), c.d_model, c.embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # keep the bf16 input, not RMSNorm's fp32 copies (same numbers)
            return self.ff_out(checkpoint(self.ln_f, x, use_reentrant=False))[0]
        return self.ff_out(self.ln_f(x))[0]


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
def vocab_parallel_masked_losses(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``Σ_{masked i} CE_i / p_mask`` ``[b]`` from vocab-sharded logits ``[s, b, V/tp]``.

    Only masked positions are selected, and the softmax is reduced across the TP group by
    megatron's ``vocab_parallel_cross_entropy``; the full-vocabulary logits never exist.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    selected = logits.transpose(0, 1)[masked].float()  # [n_masked, V/tp]
    rows = masked.nonzero(as_tuple=True)[0]
    ce = vocab_parallel_cross_entropy(selected, targets[masked])
    per_sample = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    return per_sample.index_add(0, rows, ce / p_mask[rows].float())


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
        targets, masked, p_mask, row_weight = labels
        per_sample = vocab_parallel_masked_losses(logits, targets, masked, p_mask)
        loss = (per_sample * row_weight.float()).sum()
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
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    class LLaDAPipeline(PipelineModule):
        """PipelineModule with our stage boundaries (embedding on the first stage, head on the
        last, blocks per ``layout.stage_blocks``)."""

        def _partition_layers(self, method="uniform"):
            self.parts = layout.stage_boundaries()
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def to(self, *args, **kwargs):
            if any(p.is_meta for p in self.parameters()):
                return self  # PipelineModule's __init__ moves the stage; parallelize allocates it itself
            return super().to(*args, **kwargs)

    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    coord = topology.get_coord(dist.get_rank())
    if (coord.pipe, coord.data, coord.model) != layout.coordinates(dist.get_rank()):
        raise RuntimeError("DeepSpeed pipeline topology disagrees with megatron's rank order")
    return LLaDAPipeline(layers=specs, loss_fn=loss, topology=topology, partition_method="uniform")


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
    _materialize(module, device)

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
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
        eps=eps,
    )
    kwargs = {} if layout.pp > 1 else {"mpu": MegatronMPU()}
    ds_config = deepspeed_config(layout, grad_clip, precision, sum(p.numel() for p in params))
    with zero1_bf16_with_fp32_accumulation():
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, **kwargs)
    if layout.zero_stage == 0 and precision == "fp32":
        _use_model_parallel_clipping(engine, params, grad_clip)
    return ParallelModel(engine=engine, layers=layers, loss=loss, layout=layout, device=device)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device module's parameters and buffers on ``device`` (uninitialized), in
    place of ``Module.to_empty``, which makes new Parameters and would drop the attributes that
    megatron and ``_mark_partitioned`` set on them (``tensor_model_parallel``, ``partition_dim``)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                m._parameters[name] = new
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


def _use_model_parallel_clipping(engine, params: list[nn.Parameter], grad_clip: float) -> None:
    """DeepSpeed's ZeRO-0 fp32 path clips with ``runtime.utils.clip_grad_norm_(mpu=...)``; under a
    PipelineModule its "model-parallel rank" spans pipe×TP, so replicated parameters on stages > 0
    drop out of the norm (3d-parallel.md A.2), and it never records the norm. Replace it with
    :func:`global_grad_norm` + torch-style clipping, and record the norm for reporting."""

    def clip() -> None:
        norm = global_grad_norm(params)
        if grad_clip > 0:
            coef = grad_clip / (float(norm) + 1e-6)
            if coef < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip


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

