"""``python -m tools.plan CONFIG [--gpus N]``: parameters, FLOPs, memory per GPU and layouts.

CONFIG is a model YAML (``configs/model/llada_8b.yaml``) or a run config. Without ``--gpus`` it
prints the parameter counts and the model FLOPs per token (bidirectional attention: no causal
halving). With ``--gpus N`` it also prints the memory per GPU by part and a ranked list of
TP/PP/DP/ZeRO/micro-batch/recompute layouts that fit in ``--gpu-mem-gb``.

The memory model (all arithmetic in small pure functions below; GB = 1e9 bytes):

- model states, mixed-precision AdamW (ZeRO paper): bf16 weights 2, bf16 gradients 2, fp32
  master weights + momentum + variance 12 bytes per parameter = 16 Ψ; ZeRO-1 shards the 12,
  ZeRO-2 also the gradients, ZeRO-3 also the weights, over the data-parallel ranks.
- TP=t and PP=p split the parameters: a stage holds its blocks / t, plus the embedding (first
  stage) or the final norm and LM head (last stage), vocabulary-parallel over t.
- activations (LLaDA block, FlashAttention, bf16; performance.md 5.2): ``34·s·b·h`` bytes per
  layer and micro-batch without recomputation, ``2·s·b·h`` (the layer input) with full
  recomputation plus one layer's ``34·s·b·h`` working set; divided by t (sequence parallelism is
  assumed whenever TP > 1). With 1F1B, stage i holds ``min(p - i, m)`` micro-batches in flight.
- LM-head logits on the last stage: ``s·b·V/t`` logits × 8 bytes (bf16 logits, their fp32 copy
  for the loss, the bf16 logits gradient).
- buffers: a fixed reserve (CUDA context, NCCL, allocator fragmentation; ``--reserve-gb``) plus,
  under ZeRO-3, two gathered layers of bf16 weights.
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
# Mixed-precision AdamW bytes per parameter (ZeRO paper, K = 12).
WEIGHT_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12
# Per-layer activation bytes in units of s·b·h (performance.md 5.2, LLaDA block + FlashAttention).
ACT_SBH_NO_RECOMPUTE = 34
ACT_SBH_FULL_RECOMPUTE = 2
LOGIT_BYTES = 8  # bf16 logits + fp32 copy for the loss + bf16 logits gradient
TIGHT_FRACTION = 0.9  # layouts above this share of GPU memory rank after the others
DEFAULT_GLOBAL_BATCH = 1280  # LLaDA's, used when CONFIG is a model-only YAML


# ----- pure arithmetic ----------------------------------------------------------------------------
def model_state_bytes(num_params: float, zero_stage: int, dp: int) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer states for ``num_params`` parameters
    held by a data-parallel group of ``dp`` ranks under ZeRO stage 0-3 (mixed-precision AdamW).

    ZeRO-0: 16Ψ; ZeRO-1: 4Ψ + 12Ψ/dp; ZeRO-2: 2Ψ + 14Ψ/dp; ZeRO-3: 16Ψ/dp.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    return {
        "weights": WEIGHT_BYTES * num_params / (dp if zero_stage >= 3 else 1),
        "gradients": GRAD_BYTES * num_params / (dp if zero_stage >= 2 else 1),
        "optimizer": OPTIMIZER_BYTES * num_params / (dp if zero_stage >= 1 else 1),
    }


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


def activation_bytes_per_layer(seq_len: int, micro_batch: int, d_model: int, tp: int, recompute: bool) -> float:
    """Stored activations of one block for one micro-batch, bytes (bf16).

    ``34·s·b·h/t`` without recomputation, ``2·s·b·h/t`` (the block input) with full recomputation.
    """
    sbh = seq_len * micro_batch * d_model
    return (ACT_SBH_FULL_RECOMPUTE if recompute else ACT_SBH_NO_RECOMPUTE) * sbh / tp


def logits_bytes(seq_len: int, micro_batch: int, embedding_size: int, tp: int) -> float:
    """LM-head logits memory for one micro-batch: ``s·b·V/t × 8`` bytes."""
    return seq_len * micro_batch * embedding_size / tp * LOGIT_BYTES


def pipeline_bubble(pp: int, num_micro_batches: int) -> float:
    """Idle fraction added by a 1F1B pipeline: ``(p - 1) / m`` (0 without pipelining)."""
    return (pp - 1) / num_micro_batches


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    recompute: bool
    grad_accum: int  # micro-batches per optimizer step per data-parallel rank
    seq_len: int
    parts: dict  # bytes per GPU by part, on the most loaded stage
    total: float  # bytes per GPU, the most loaded stage

    @property
    def compute_overhead(self) -> float:
        """Extra time over the ideal: 1/3 for full recomputation (one more forward), plus the
        pipeline bubble."""
        return (1 / 3 if self.recompute else 0.0) + pipeline_bubble(self.pp, self.grad_accum)

    capacity: float = 0.0  # bytes per GPU available

    @property
    def tight(self) -> bool:
        """Uses more than :data:`TIGHT_FRACTION` of the GPU: fits on paper, little headroom."""
        return self.total > TIGHT_FRACTION * self.capacity

    def rank_key(self) -> tuple:
        """Layouts with headroom (<= 90 % of the GPU) first; among them fewer recomputed/idle FLOPs first, then less model parallelism (TP before PP at equal
        degree), less ZeRO communication (0/1 < 2 < 3), micro-batches of at least 4096 tokens
        (large enough GEMMs), then less memory (more headroom)."""
        zero_comm = {0: 0, 1: 0, 2: 1, 3: 2}[self.zero_stage]
        return (self.tight, round(self.compute_overhead, 2), self.tp * self.pp, self.pp, zero_comm,
                -min(self.micro_batch * self.seq_len, 4096), self.total)


def layout_memory(
    cfg: ModelConfig, *, tp: int, pp: int, dp: int, zero_stage: int, seq_len: int,
    micro_batch: int, grad_accum: int, recompute: bool, reserve_bytes: float,
) -> tuple[dict, float]:
    """Memory per GPU by part on the most loaded pipeline stage: ``(parts, total)`` in bytes."""
    layers = cfg.n_layers // pp
    best_parts, best_total = None, -1.0
    for stage in range(pp):
        parts = dict(model_state_bytes(stage_params(cfg, tp, pp, stage), zero_stage, dp))
        in_flight = min(pp - stage, grad_accum)
        per_layer = activation_bytes_per_layer(seq_len, micro_batch, cfg.d_model, tp, recompute)
        acts = in_flight * layers * per_layer
        if recompute:  # one block's full working set during its recomputation
            acts += activation_bytes_per_layer(seq_len, micro_batch, cfg.d_model, tp, False)
        parts["activations"] = acts
        parts["logits"] = logits_bytes(seq_len, micro_batch, cfg.embedding_size, tp) if stage == pp - 1 else 0.0
        gathered = 2 * WEIGHT_BYTES * (cfg.params_per_layer() / tp) if zero_stage == 3 else 0.0
        parts["buffers"] = reserve_bytes + gathered
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
    :meth:`Layout.rank_key`); for each (TP, PP, ZeRO, recompute) only the best micro-batch."""
    found: dict[tuple, Layout] = {}
    for tp in tp_candidates(cfg, gpus, gpus_per_node):
        for pp in (p for p in range(1, cfg.n_layers + 1) if cfg.n_layers % p == 0 and gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            mbs_options = micro_batches or [b for b in (1, 2, 4, 8, 16, 32) if b <= global_batch]
            for mbs in mbs_options:
                if global_batch % (mbs * dp):
                    continue
                accum = global_batch // (mbs * dp)
                for zero in zero_candidates(pp, dp):
                    for recompute in (False, True):
                        parts, total = layout_memory(
                            cfg, tp=tp, pp=pp, dp=dp, zero_stage=zero, seq_len=seq_len,
                            micro_batch=mbs, grad_accum=accum, recompute=recompute,
                            reserve_bytes=reserve_bytes,
                        )
                        if total > capacity_bytes:
                            continue
                        lay = Layout(tp, pp, dp, zero, mbs, recompute, accum, seq_len, parts, total, capacity_bytes)
                        key = (tp, pp, zero, recompute)
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
    lines = [
        f"memory per GPU (GB = 1e9 bytes), data parallel over {gpus} GPU(s), TP=PP=1:",
        f"  model states, mixed-precision AdamW ({WEIGHT_BYTES}+{GRAD_BYTES}+{OPTIMIZER_BYTES} bytes/param = "
        f"{_gb(16 * psi)} GB unsharded):",
        "    ZeRO   weights  gradients  optimizer  total",
    ]
    for z in range(4):
        s = model_state_bytes(psi, z, gpus)
        lines.append(f"    {z}     {_gb(s['weights']):>8} {_gb(s['gradients']):>10} {_gb(s['optimizer']):>10} {_gb(sum(s.values())):>6}")
    no = cfg.n_layers * activation_bytes_per_layer(seq_len, micro_batch, cfg.d_model, 1, False)
    full = cfg.n_layers * activation_bytes_per_layer(seq_len, micro_batch, cfg.d_model, 1, True)
    full += activation_bytes_per_layer(seq_len, micro_batch, cfg.d_model, 1, False)
    lines += [
        f"  activations, seq_len {seq_len}, micro-batch {micro_batch}:",
        f"    no recomputation     {_gb(no):>8} GB  ({ACT_SBH_NO_RECOMPUTE}·s·b·h per layer)",
        f"    full recomputation   {_gb(full):>8} GB  ({ACT_SBH_FULL_RECOMPUTE}·s·b·h per layer + one layer's working set)",
        f"  LM-head logits         {_gb(logits_bytes(seq_len, micro_batch, cfg.embedding_size, 1)):>8} GB  (s·b·V × {LOGIT_BYTES} bytes)",
        f"  buffers                {_gb(reserve_bytes):>8} GB  (CUDA context, NCCL, fragmentation; ZeRO-3 adds "
        f"{_gb(2 * WEIGHT_BYTES * cfg.params_per_layer())} GB of gathered layers)",
    ]
    return lines


def describe_layouts(layouts: list[Layout], *, gpus: int, capacity_bytes: float, top: int) -> list[str]:
    if not layouts:
        return [
            f"no layout fits: every TP/PP/ZeRO/micro-batch/recompute combination on {gpus} GPU(s) needs more "
            f"than {_gb(capacity_bytes)} GB per GPU. Use more GPUs, a shorter --seq-len, or more GPU memory."
        ]
    lines = [
        f"layouts that fit in {_gb(capacity_bytes)} GB per GPU, best first (TP>1 assumes "
        "parallel.sequence_parallel=true):",
        "  rank  tp  pp   dp  zero  mbs  accum  recompute  overhead  weights  grads  optim  activ  logits  buffers  total GB",
    ]
    for i, lay in enumerate(layouts[:top], 1):
        p = lay.parts
        lines.append(
            f"  {i:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero_stage:>5} {lay.micro_batch:>4} {lay.grad_accum:>6}"
            f"  {'full' if lay.recompute else 'none':>9} {lay.compute_overhead * 100:>8.1f}%"
            f" {_gb(p['weights']):>8} {_gb(p['gradients']):>6} {_gb(p['optimizer']):>6} {_gb(p['activations']):>6}"
            f" {_gb(p['logits']):>7} {_gb(p['buffers']):>8} {_gb(lay.total):>9}"
            + ("  (tight)" if lay.tight else "")
        )
    if len(layouts) > top:
        lines.append(f"  ... {len(layouts) - top} more (--top N to show them)")
    best = layouts[0]
    lines.append(
        f"  best layout as overrides: parallel.tp={best.tp} parallel.pp={best.pp} parallel.zero_stage={best.zero_stage} "
        f"train.micro_batch_size={best.micro_batch} train.activation_checkpointing={'full' if best.recompute else 'none'}"
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
