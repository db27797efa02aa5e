"""``python -m tools.plan CONFIG [--gpus N]``: parameters, FLOPs, memory per GPU and layouts.

CONFIG is a model YAML (``configs/model/llada_8b.yaml``) or a run config. Without ``--gpus`` it
prints the parameter counts and the model FLOPs per token (bidirectional attention: no causal
halving). With ``--gpus N`` it also prints the memory per GPU by part and a ranked list of
TP/PP/DP/ZeRO/micro-batch/recompute layouts that fit in ``--gpu-mem-gb``.

The memory model (GB = 1e9 bytes) describes the engine ``train.parallelize`` configures, each term
calibrated against a measurement of that engine (tests/tools/test_plan_calibration.py, within 10 %):

- model states per parameter, by DeepSpeed path (:data:`STATE_BYTES`; measured on gloo at two model
  sizes and two data-parallel sizes): bf16 + ZeRO-1 is DeepSpeedZeroOptimizer with fp32
  gradient accumulation (``train.internals``): 2 (bf16 weights) + 5 (the fp32 ``grad_accum``
  of every parameter, alive over the accumulation micro-batches, and the bf16 gradients being
  folded into it) + 12/dp (fp32 masters and AdamW moments), measured at the peak (after a
  micro-batch's backward); bf16 + ZeRO-2: 2 + 18/dp; bf16 + ZeRO-3: 20/dp;
  bf16 + ZeRO-0 (DeepSpeed's unfused fp16-style optimizer): 20. ZeRO-2/3 accumulate gradients in
  bf16 (ranked after the fp32-accumulating paths).
- TP=t and PP=p split the parameters: a stage holds its blocks / t, plus the embedding (first
  stage) or the final norm and LM head (last stage), vocabulary-parallel over t.
- activations of one block and micro-batch (:func:`block_activation_bytes`, bf16, FlashAttention
  keeping q, k, v, out and an fp32 log-sum-exp; RMSNorm and silu·up recomputed in backward):
  ``none`` 2sb(6h + 2kv + 3f) + 4sbH, ``selective`` 2sb(6h + 2kv + f), ``full`` 2sbh (the block
  input), divided by t (sequence parallelism is assumed whenever TP > 1), plus the fp32 RoPE
  tables. For LLaDA-8B: 34.3, 22.3 and 2 s·b·h. With 1F1B, stage i holds ``min(p - i, m)``
  micro-batches in flight; full recomputation adds one block's working set.
- LM head and loss on the last stage: ``s·b·V/t × 10`` bytes at 100 % masked (bf16 logits, the
  fp32 copy of the masked logits, the fp32 shifted logits that become the softmax).
- buffers: a fixed reserve (CUDA context, NCCL, allocator fragmentation; ``--reserve-gb``) plus
  DeepSpeed's ZeRO-2/3 gradient bucket (``reduce_bucket_size`` elements, bf16; measured as the
  intercept) and, under ZeRO-3, two gathered layers of bf16 weights (not measured).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig
from tools.plan_comm import Interconnect, describe_step_times, rank_by_step_time

GB = 1e9
GIB = 2**30
# Bytes per parameter held by each DeepSpeed path of train.parallelize, as (replicated, sharded
# over the data-parallel ranks) per part; measured (tests/train/memory_worker.py).
STATE_BYTES = {
    # (precision, zero): {part: (replicated, sharded)}
    ("bf16", 0): {"weights": (6, 0), "gradients": (6, 0), "optimizer": (8, 0)},  # fp32 masters, fp32 grads
    ("bf16", 1): {"weights": (2, 0), "gradients": (5, 0), "optimizer": (0, 12)},  # ZeRO-1, fp32 grad_accum
    ("bf16", 2): {"weights": (2, 0), "gradients": (0, 6), "optimizer": (0, 12)},  # bf16 + fp32 grad partitions
    ("bf16", 3): {"weights": (0, 2), "gradients": (0, 6), "optimizer": (0, 12)},
    ("fp32", 0): {"weights": (4, 0), "gradients": (4, 0), "optimizer": (8, 0)},
    ("fp32", 1): {"weights": (4, 0), "gradients": (0, 8), "optimizer": (0, 12)},  # grads kept as partitions
    ("fp32", 2): {"weights": (4, 0), "gradients": (0, 8), "optimizer": (0, 12)},
    ("fp32", 3): {"weights": (0, 4), "gradients": (0, 8), "optimizer": (0, 12)},
}
BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size (ZeRO-2/3 gradient bucket, bf16)
LOGIT_BYTES = 10  # bf16 logits + fp32 copy of the masked logits + fp32 shifted logits/softmax
CHECKPOINTING = ("none", "selective", "full")
TIGHT_FRACTION = 0.9  # layouts above this share of GPU memory rank after the others
DEFAULT_GLOBAL_BATCH = 1280  # LLaDA's, used when CONFIG is a model-only YAML


# ----- pure arithmetic ----------------------------------------------------------------------------
def model_state_bytes(num_params: float, zero_stage: int, dp: int, precision: str = "bf16") -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer states for ``num_params`` parameters held
    by a data-parallel group of ``dp`` ranks, for DeepSpeed's path at this ZeRO stage and precision
    (:data:`STATE_BYTES`). bf16: ZeRO-0 20Ψ, ZeRO-1 7Ψ + 12Ψ/dp, ZeRO-2 2Ψ + 18Ψ/dp, ZeRO-3 20Ψ/dp."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if (precision, zero_stage) not in STATE_BYTES:
        raise ValueError(f"no memory model for precision={precision}, zero_stage={zero_stage} (ZeRO 0-3, fp32/bf16)")
    return {part: (rep + shard / dp) * num_params for part, (rep, shard) in STATE_BYTES[(precision, zero_stage)].items()}


def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one GPU of pipeline stage ``stage`` (0-based) under TP=tp, PP=pp.

    Blocks split evenly over stages; linear weights and the vocabulary split over tp (norm
    weights are small and counted whole); the embedding sits on the first stage, the final
    norm and LM head on the last.
    """
    d = cfg.d_model
    per_layer = (cfg.params_per_layer() - 2 * d) / tp + 2 * d
    n = (cfg.n_layers // pp) * per_layer
    table = cfg.embedding_size * d / tp
    if stage == 0:
        n += table
    if stage == pp - 1:
        n += table + d
    return n


def block_activation_bytes(cfg: ModelConfig, seq_len: int, micro_batch: int, tp: int, mode: str) -> float:
    """Bytes one block keeps for backward for one micro-batch (bf16), by checkpointing mode.

    ``none``: the block input, both norm outputs, q, k, v, the attention output, the residual h,
    the SwiGLU gate, up and product (2 bytes each) and the fp32 log-sum-exp; ``selective``: the
    same without the attention internals and with only the SwiGLU product; ``full``: the block
    input. All divided by ``tp`` (sequence parallelism); plus the fp32 RoPE cos/sin tables."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"checkpointing mode must be one of {CHECKPOINTING}, got {mode!r}")
    s, b, h, kv, f = seq_len, micro_batch, cfg.d_model, cfg.kv_dim, cfg.mlp_hidden_size
    rope = 2 * 4 * s * cfg.head_dim
    if mode == "full":
        return 2 * s * b * h / tp
    if mode == "selective":
        return 2 * s * b * (6 * h + 2 * kv + f) / tp + rope
    return (2 * s * b * (6 * h + 2 * kv + 3 * f) + 4 * s * b * cfg.n_heads) / tp + rope


def activation_bytes_per_layer(seq_len: int, micro_batch: int, d_model: int, tp: int, recompute: bool) -> float:
    """LLaDA-shaped block (MHA, f = 3h) without/with full recomputation: ``block_activation_bytes``
    of a model of width ``d_model``."""
    cfg = ModelConfig(d_model=d_model, mlp_hidden_size=3 * d_model)
    return block_activation_bytes(cfg, seq_len, micro_batch, tp, "full" if recompute else "none")


def logits_bytes(seq_len: int, micro_batch: int, embedding_size: int, tp: int) -> float:
    """LM head + loss at 100 % masked: ``s·b·V/t × 10`` bytes."""
    return seq_len * micro_batch * embedding_size / tp * LOGIT_BYTES


def pipeline_bubble(pp: int, num_micro_batches: int) -> float:
    """Idle fraction added by a 1F1B pipeline: ``(p - 1) / m`` (0 without pipelining)."""
    return (pp - 1) / num_micro_batches


def recompute_overhead(cfg: ModelConfig, seq_len: int, mode: str) -> float:
    """Extra FLOPs of recomputation over the model FLOPs: ``full`` one more forward (~1/3);
    ``selective`` the attention core and the SwiGLU gate/up GEMMs once more."""
    if mode == "none":
        return 0.0
    if mode == "full":
        return 1 / 3
    extra = cfg.n_layers * (4.0 * seq_len * cfg.d_model + 4.0 * cfg.d_model * cfg.mlp_hidden_size)
    return extra / cfg.flops_per_token(seq_len)


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    checkpointing: str
    grad_accum: int  # micro-batches per optimizer step per data-parallel rank
    seq_len: int
    parts: dict  # bytes per GPU by part, on the most loaded stage
    total: float  # bytes per GPU, the most loaded stage
    capacity: float = 0.0  # bytes per GPU available
    recompute_cost: float = 0.0  # extra FLOPs of recomputation, as a fraction of the model FLOPs

    @property
    def recompute(self) -> bool:
        return self.checkpointing == "full"

    @property
    def compute_overhead(self) -> float:
        """Extra time over the ideal: recomputation plus the pipeline bubble."""
        return self.recompute_cost + pipeline_bubble(self.pp, self.grad_accum)

    @property
    def tight(self) -> bool:
        """Uses more than :data:`TIGHT_FRACTION` of the GPU: fits on paper, little headroom."""
        return self.total > TIGHT_FRACTION * self.capacity

    def rank_key(self) -> tuple:
        """Layouts with headroom (<= 90 % of the GPU) first; among them fewer recomputed/idle FLOPs
        first, then fp32 gradient accumulation (DeepSpeed's bf16 ZeRO-2/3 accumulate the
        micro-batches' gradients in bf16), less model parallelism (TP before PP at equal degree),
        less ZeRO communication (2 before 3), micro-batches of at least 4096 tokens (large enough
        GEMMs), then less memory."""
        bf16_accumulation = self.zero_stage >= 2
        zero_comm = {0: 0, 1: 0, 2: 1, 3: 2}[self.zero_stage]
        return (self.tight, round(self.compute_overhead, 2), bf16_accumulation, self.tp * self.pp, self.pp,
                zero_comm, -min(self.micro_batch * self.seq_len, 4096), self.total)


def layout_memory(
    cfg: ModelConfig, *, tp: int, pp: int, dp: int, zero_stage: int, seq_len: int,
    micro_batch: int, grad_accum: int, checkpointing: str = "none", reserve_bytes: float,
    precision: str = "bf16",
) -> tuple[dict, float]:
    """Memory per GPU by part on the most loaded pipeline stage: ``(parts, total)`` in bytes."""
    layers = cfg.n_layers // pp
    best_parts, best_total = None, -1.0
    for stage in range(pp):
        parts = dict(model_state_bytes(stage_params(cfg, tp, pp, stage), zero_stage, dp, precision))
        in_flight = min(pp - stage, grad_accum)
        acts = in_flight * layers * block_activation_bytes(cfg, seq_len, micro_batch, tp, checkpointing)
        if checkpointing == "full":  # one block's full working set during its recomputation
            acts += block_activation_bytes(cfg, seq_len, micro_batch, tp, "none")
        parts["activations"] = acts
        parts["logits"] = logits_bytes(seq_len, micro_batch, cfg.embedding_size, tp) if stage == pp - 1 else 0.0
        bucket = BUCKET_ELEMENTS * 2 if zero_stage >= 2 else 0.0
        # ZeRO-3 also gathers the bf16 weights of the layers it is computing (about two at a time)
        gathered = 2 * 2 * (cfg.params_per_layer() / tp) if zero_stage == 3 else 0.0
        parts["buffers"] = reserve_bytes + bucket + gathered
        total = sum(parts.values())
        if total > best_total:
            best_parts, best_total = parts, total
    return best_parts, best_total


def tp_candidates(cfg: ModelConfig, gpus: int, gpus_per_node: int) -> list[int]:
    """TP sizes that divide heads, kv heads, the vocabulary (embedding rows) and the MLP width,
    stay within one node (<= gpus_per_node, at most 8) and divide the GPU count."""
    limit = min(8, gpus_per_node, gpus)
    return [
        t for t in range(1, limit + 1)
        if gpus % t == 0
        and all(x % t == 0 for x in (cfg.n_heads, cfg.n_kv_heads, cfg.embedding_size, cfg.mlp_hidden_size))
    ]


def zero_candidates(pp: int, dp: int) -> tuple[int, ...]:
    """ZeRO stages worth listing: none without data parallelism (nothing to shard over); only 0
    and 1 with a pipeline (DeepSpeed's pipeline engine cannot combine with ZeRO-2/3)."""
    if dp == 1:
        return (0,)
    return (0, 1) if pp > 1 else (0, 1, 2, 3)


def enumerate_layouts(
    cfg: ModelConfig, *, gpus: int, seq_len: int, global_batch: int, capacity_bytes: float,
    gpus_per_node: int = 8, micro_batches: list[int] | None = None, reserve_bytes: float = 4 * GB,
) -> list[Layout]:
    """All layouts that fit in ``capacity_bytes`` per GPU, ranked best first (see
    :meth:`Layout.rank_key`); for each (TP, PP, ZeRO, checkpointing) only the best micro-batch."""
    found: dict[tuple, Layout] = {}
    for tp in tp_candidates(cfg, gpus, gpus_per_node):
        for pp in (p for p in range(1, cfg.n_layers + 1) if cfg.n_layers % p == 0 and gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            mbs_options = micro_batches or [b for b in (1, 2, 4, 8, 16, 32) if b <= global_batch]
            for mbs in mbs_options:
                if global_batch % (mbs * dp) or (tp > 1 and seq_len % tp):
                    continue
                accum = global_batch // (mbs * dp)
                for zero in zero_candidates(pp, dp):
                    for mode in CHECKPOINTING:
                        parts, total = layout_memory(
                            cfg, tp=tp, pp=pp, dp=dp, zero_stage=zero, seq_len=seq_len,
                            micro_batch=mbs, grad_accum=accum, checkpointing=mode,
                            reserve_bytes=reserve_bytes,
                        )
                        if total > capacity_bytes:
                            continue
                        lay = Layout(tp, pp, dp, zero, mbs, mode, accum, seq_len, parts, total, capacity_bytes,
                                     recompute_overhead(cfg, seq_len, mode))
                        key = (tp, pp, zero, mode)
                        if key not in found or lay.rank_key() < found[key].rank_key():
                            found[key] = lay
    return sorted(found.values(), key=Layout.rank_key)


# ----- config reading -----------------------------------------------------------------------------
@dataclass
class PlanInput:
    model: ModelConfig
    seq_len: int
    global_batch: int
    micro_batch: int | None


def read_plan_input(path: str) -> PlanInput:
    """A model YAML (seq len = max_sequence_length, global batch 1280) or a run config (its
    train.seq_len, train.global_batch_size and train.micro_batch_size; data paths need not exist)."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(p)
    except Exception as e:  # YAML syntax errors
        raise ValueError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    if not OmegaConf.is_dict(raw):
        raise ValueError(f"{path}: expected a mapping (a model YAML or a run config)")
    if not any(k in raw for k in ("model", "train", "data", "parallel", "logging", "eval")):
        try:
            model = ModelConfig.from_dict(OmegaConf.to_container(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
        return PlanInput(model, model.max_sequence_length, DEFAULT_GLOBAL_BATCH, None)
    from train.config import load_config  # ConfigError is a ValueError

    cfg = load_config(p, check_paths=False)
    return PlanInput(cfg.model, cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size)


# ----- report -------------------------------------------------------------------------------------
def _gb(x: float) -> str:
    return f"{x / GB:,.1f}"


def describe_model(cfg: ModelConfig, seq_len: int) -> list[str]:
    n_mm = cfg.num_matmul_params()
    fpt = cfg.flops_per_token(seq_len)
    attn = 12.0 * cfg.n_layers * cfg.d_model * seq_len
    return [
        f"parameters:            {cfg.num_params():,}",
        f"  non-embedding:       {cfg.num_non_embedding_params():,}",
        f"  matmul (N_mm):       {n_mm:,}  (linear weights incl. LM head; no embedding, no norms)",
        f"FLOPs per token at seq_len {seq_len} (forward + backward, bidirectional: no causal halving):",
        f"  6·N_mm               {6.0 * n_mm / 1e9:,.2f} GFLOP",
        f"  12·L·d·s (attention) {attn / 1e9:,.2f} GFLOP",
        f"  total                {fpt / 1e9:,.2f} GFLOP/token  ({fpt * seq_len:.3e} per sequence)",
        f"  with full recompute  {(fpt + (2.0 * n_mm + 4.0 * cfg.n_layers * cfg.d_model * seq_len)) / 1e9:,.2f} GFLOP/token (hardware FLOPs)",
    ]


def describe_memory(cfg: ModelConfig, *, gpus: int, seq_len: int, micro_batch: int, reserve_bytes: float) -> list[str]:
    psi = cfg.num_params()
    sbh = seq_len * micro_batch * cfg.d_model
    lines = [
        f"memory per GPU (GB = 1e9 bytes), data parallel over {gpus} GPU(s), TP=PP=1, bf16 (DeepSpeed's paths, measured):",
        "    ZeRO   weights  gradients  optimizer  total   bytes/param",
    ]
    for z in (0, 1, 2, 3):
        st = model_state_bytes(psi, z, gpus)
        lines.append(f"    {z}     {_gb(st['weights']):>8} {_gb(st['gradients']):>10} {_gb(st['optimizer']):>10} "
                     f"{_gb(sum(st.values())):>6}   {sum(st.values()) / psi:.2f}")
    lines.append(f"  activations, seq_len {seq_len}, micro-batch {micro_batch} ({cfg.n_layers} blocks):")
    for mode in CHECKPOINTING:
        per = block_activation_bytes(cfg, seq_len, micro_batch, 1, mode)
        total = cfg.n_layers * per + (block_activation_bytes(cfg, seq_len, micro_batch, 1, "none") if mode == "full" else 0)
        lines.append(f"    {mode:<10} {_gb(total):>8} GB  ({per / sbh:.1f}·s·b·h per block"
                     + (" + one block's working set)" if mode == "full" else ")"))
    lines += [
        f"  LM head + loss         {_gb(logits_bytes(seq_len, micro_batch, cfg.embedding_size, 1)):>8} GB  (s·b·V × {LOGIT_BYTES} bytes)",
        f"  buffers                {_gb(reserve_bytes):>8} GB  (CUDA context, NCCL, fragmentation; ZeRO-2/3 add a "
        f"{_gb(BUCKET_ELEMENTS * 2)} GB gradient bucket, ZeRO-3 {_gb(4 * cfg.params_per_layer())} GB of gathered layers)",
    ]
    return lines


def describe_layouts(layouts: list[Layout], *, gpus: int, capacity_bytes: float, top: int) -> list[str]:
    if not layouts:
        return [
            f"no layout fits: every TP/PP/ZeRO/micro-batch/checkpointing combination on {gpus} GPU(s) needs more "
            f"than {_gb(capacity_bytes)} GB per GPU. Use more GPUs, a shorter --seq-len, or more GPU memory."
        ]
    lines = [
        f"layouts that fit in {_gb(capacity_bytes)} GB per GPU, best first (TP>1 assumes "
        "parallel.sequence_parallel=true):",
        "  rank  tp  pp   dp  zero  mbs  accum  checkpoint  overhead  weights  grads  optim  activ  logits  buffers  total GB",
    ]
    for i, lay in enumerate(layouts[:top], 1):
        p = lay.parts
        lines.append(
            f"  {i:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero_stage:>5} {lay.micro_batch:>4} {lay.grad_accum:>6}"
            f"  {lay.checkpointing:>10} {lay.compute_overhead * 100:>8.1f}%"
            f" {_gb(p['weights']):>8} {_gb(p['gradients']):>6} {_gb(p['optimizer']):>6} {_gb(p['activations']):>6}"
            f" {_gb(p['logits']):>7} {_gb(p['buffers']):>8} {_gb(lay.total):>9}"
            + ("  (tight)" if lay.tight else "")
        )
    if len(layouts) > top:
        lines.append(f"  ... {len(layouts) - top} more (--top N to show them)")
    best = layouts[0]
    lines.append(
        f"  best layout as overrides: parallel.tp={best.tp} parallel.pp={best.pp} parallel.zero_stage={best.zero_stage} "
        f"train.micro_batch_size={best.micro_batch} train.activation_checkpointing={best.checkpointing}"
        + (" parallel.sequence_parallel=true" if best.tp > 1 else "")
    )
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a model YAML (configs/model/llada_8b.yaml) or a run config")
    ap.add_argument("--gpus", type=int, help="number of GPUs: adds memory per GPU and ranked layouts")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0,
                    help="memory of one GPU as marketed, in GiB (80 for H100-80GB = 85.9 GB); default 80")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP stays within a node); default 8")
    ap.add_argument("--seq-len", type=int, help="sequence length (default: train.seq_len, or the model's max)")
    ap.add_argument("--micro-batch", type=int, help="only consider this micro-batch size")
    ap.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: train.global_batch_size, or 1280)")
    ap.add_argument("--reserve-gb", type=float, default=4.0, help="per-GPU reserve for CUDA context, NCCL, fragmentation (GB); default 4")
    ap.add_argument("--top", type=int, default=10, help="layouts to list; default 10")
    ap.add_argument("--nvlink-gbps", type=float, default=360.0, help="NVLink bus bandwidth per GPU inside a node (GB/s); default 360")
    ap.add_argument("--ib-gbps", type=float, default=45.0, help="InfiniBand bandwidth per GPU between nodes (GB/s); default 45")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        inp = read_plan_input(args.config)
        seq_len = args.seq_len or inp.seq_len
        global_batch = args.global_batch or inp.global_batch
        for name, value in (("--gpus", args.gpus), ("--seq-len", seq_len), ("--micro-batch", args.micro_batch),
                            ("--global-batch", global_batch), ("--gpus-per-node", args.gpus_per_node), ("--top", args.top)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if args.gpu_mem_gb <= 0:
            raise ValueError(f"--gpu-mem-gb must be positive, got {args.gpu_mem_gb}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    cfg = inp.model
    out = [f"config: {args.config}"] + describe_model(cfg, seq_len)
    if args.gpus:
        capacity = args.gpu_mem_gb * GIB
        reserve = args.reserve_gb * GB
        mbs = args.micro_batch or inp.micro_batch or 1
        out.append("")
        out += describe_memory(cfg, gpus=args.gpus, seq_len=seq_len, micro_batch=mbs, reserve_bytes=reserve)
        layouts = enumerate_layouts(
            cfg, gpus=args.gpus, seq_len=seq_len, global_batch=global_batch, capacity_bytes=capacity,
            gpus_per_node=args.gpus_per_node, micro_batches=[args.micro_batch] if args.micro_batch else None,
            reserve_bytes=reserve,
        )
        net = Interconnect(args.nvlink_gbps, args.ib_gbps, args.gpus_per_node)
        layouts = rank_by_step_time(cfg, layouts, net)  # communication-aware ranking (tools/plan_comm.py)
        out.append("")
        out.append(f"global batch {global_batch} sequences of {seq_len} tokens "
                   f"({global_batch * seq_len:,} tokens, {cfg.flops_per_token(seq_len) * global_batch * seq_len:.3e} FLOPs per step)")
        out += describe_layouts(layouts, gpus=args.gpus, capacity_bytes=capacity, top=args.top)
        if layouts:
            out += [""] + describe_step_times(layouts, gpus=args.gpus, top=args.top, net=net)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
