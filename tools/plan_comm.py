"""Communication per optimizer step: the minimum bytes a layout must move, the bytes difftron's
DeepSpeed/megatron path moves (measured by ``python -m tools.bench comm``), and an interconnect
model that turns them into time (NVLink inside a node, InfiniBand between nodes).

All byte counts are per rank and per optimizer step, under the ring algorithms' accounting of
``tools.benchmarks.collectives`` (all-reduce ``2·S·(n-1)/n``, reduce-scatter / all-gather ``S·(n-1)/n``,
point-to-point ``S``). Ψ is the number of parameters one rank holds before ZeRO sharding (its
pipeline stage's, divided by TP), ``m`` the micro-batches per step on a data-parallel rank,
``b_g`` the bytes of a communicated gradient element and ``b_w`` of a weight element.
The formulas are written out in docs/communication.md.
"""

from __future__ import annotations

from dataclasses import dataclass


def ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def dp_minimum(psi: float, dp: int, zero_stage: int, grad_bytes: int, weight_bytes: int, micro_batches: int) -> dict:
    """Minimum data-parallel bytes per rank per step: ``{"grad": ..., "param": ...}``.

    - ZeRO-0: all-reduce the (locally accumulated) gradients once: ``2·Ψ·b_g·(dp-1)/dp``.
    - ZeRO-1: reduce-scatter them once and all-gather the updated weights:
      ``Ψ·(b_g + b_w)·(dp-1)/dp``.
    - ZeRO-2: gradients are partitioned, so each micro-batch's leave the rank:
      ``Ψ·(m·b_g + b_w)·(dp-1)/dp``.
    - ZeRO-3: weights are partitioned too: gathered for each micro-batch's forward and backward:
      ``Ψ·m·(b_g + 2·b_w)·(dp-1)/dp``.
    """
    f = ring(dp) * psi
    if zero_stage == 0:
        return {"grad": 2 * f * grad_bytes, "param": 0.0}
    if zero_stage == 1:
        return {"grad": f * grad_bytes, "param": f * weight_bytes}
    if zero_stage == 2:
        return {"grad": micro_batches * f * grad_bytes, "param": f * weight_bytes}
    if zero_stage == 3:
        return {"grad": micro_batches * f * grad_bytes, "param": 2 * micro_batches * f * weight_bytes}
    raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")


def tp_minimum(tokens: float, d_model: int, layers: int, tp: int, act_bytes: int, micro_batches: int) -> float:
    """Minimum tensor-parallel bytes per rank per step (Megatron's block: fused QKV and fused
    gate/up projections): per block and micro-batch, two all-reduces of the ``s·b·h`` activations
    in the forward pass and two in the backward (with sequence parallelism: the same bytes as an
    all-gather + reduce-scatter pair each), plus the embedding's forward all-reduce and the LM
    head's input-gradient all-reduce. ``tokens`` = s·b of one micro-batch; ``layers`` of this
    stage (embedding and head counted on every stage: an upper bound for PP > 1)."""
    sbh = tokens * d_model * act_bytes
    return micro_batches * (4 * layers + 2) * 2 * ring(tp) * sbh


def tp_difftron(tokens: float, d_model: int, layers: int, tp: int, act_bytes: int, micro_batches: int,
                masked_tokens: float = 0.0) -> float:
    """What difftron's TP layers move without sequence parallelism (separate q/k/v and gate/up
    ``ColumnParallelLinear``s: each all-reduces its input gradient): per block 2 forward and 5
    backward all-reduces of ``s·b·h``, the embedding's and the head's, and the vocab-parallel
    cross entropy's three fp32 all-reduces over the masked tokens."""
    sbh = tokens * d_model * act_bytes
    return micro_batches * ((7 * layers + 2) * 2 * ring(tp) * sbh + 3 * 2 * ring(tp) * masked_tokens * 4)


def pp_bytes(tokens: float, d_model: int, act_bytes: int, micro_batches: int, pp: int) -> float:
    """Pipeline bytes the busiest stage sends per step: a middle stage sends each micro-batch's
    activations forward and their gradients backward (``s·b·h`` each); the first and the last
    stage send one of the two (so with PP=2 every stage sends ``m·s·b·h``)."""
    if pp <= 1:
        return 0.0
    return micro_batches * (2 if pp > 2 else 1) * tokens * d_model * act_bytes


# ----- interconnect model -------------------------------------------------------------------------
@dataclass
class Interconnect:
    """Bus bandwidth per GPU in GB/s (1e9 bytes/s), as nccl-tests reports it for large messages.

    Defaults: H100 SXM nodes of 8 with NVLink 4 (~360 GB/s all-reduce bus bandwidth measured in
    practice of 450 GB/s per direction) and 8×400 Gb/s InfiniBand NDR, one HCA per GPU (~45 GB/s
    per GPU achievable of 50)."""

    nvlink_gbps: float = 360.0
    ib_gbps: float = 45.0
    gpus_per_node: int = 8
    overlap: float = 0.9  # share of overlappable communication hidden behind compute

    def bandwidth(self, group_span: int) -> float:
        """Bytes/s for a collective whose ranks span ``group_span`` consecutive GPUs' worth of
        nodes: NVLink when the group fits in a node, InfiniBand otherwise."""
        return (self.nvlink_gbps if group_span <= self.gpus_per_node else self.ib_gbps) * 1e9


def dp_group_span(tp: int, pp: int, dp: int) -> int:
    """GPUs spanned by a data-parallel group in megatron's order (tp fastest, then dp, then pp):
    consecutive DP peers are ``tp`` ranks apart."""
    return tp * dp


def step_comm_seconds(
    *, dp_bytes: float, tp_bytes: float, pp_bytes_: float, tp: int, pp: int, dp: int, net: Interconnect,
    dp_overlapped: bool,
) -> dict:
    """Seconds of communication per step and the part not hidden behind compute.

    TP traffic stays in a node (NVLink) and sits on the critical path (megatron's TP collectives
    are not overlapped here). DP traffic crosses nodes once the DP group spans more than a node;
    when it is bucketed and issued during backward/forward (``dp_overlapped``) only
    ``1 - net.overlap`` of it is exposed, else all of it. PP sends go over IB between nodes
    (assume exposed: they gate the next stage)."""
    dp_bw = net.bandwidth(dp_group_span(tp, pp, dp))
    tp_bw = net.bandwidth(tp)
    pp_bw = net.bandwidth(tp * dp * pp) if pp > 1 else net.nvlink_gbps * 1e9
    t_dp, t_tp, t_pp = dp_bytes / dp_bw, tp_bytes / tp_bw, pp_bytes_ / pp_bw
    exposed_dp = t_dp * ((1 - net.overlap) if dp_overlapped else 1.0)
    return {"dp": t_dp, "tp": t_tp, "pp": t_pp, "exposed": exposed_dp + t_tp + t_pp}


# ----- step-time prediction -----------------------------------------------------------------------
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
# Bytes difftron moves over the minimum, measured by ``python -m tools.bench comm`` (2026-11-30,
# BENCHMARKS.md): the DP path reaches its minimum (1.00x) after issue 16 and moved 1.5x with the
# BF16_Optimizer all-reduce before; TP with sequence parallelism moves 1.375x what TP without it
# moves in difftron's layers (megatron's ColumnParallelLinear re-gathers its input for the weight
# gradient, and q/k/v and gate/up gather separately).
DP_MEASURED_OVER_MINIMUM = 1.00
DP_BEFORE_OVER_MINIMUM = 1.50
SP_OVER_NO_SP = 677_273 / 492_441


@dataclass
class StepPrediction:
    compute_s: float  # model FLOPs / (peak · efficiency), with recompute and the pipeline bubble
    dp_bytes: float
    tp_bytes: float
    pp_bytes: float
    comm: dict  # seconds: dp, tp, pp, exposed
    step_s: float
    mfu: float


def predict_step(cfg, *, tp: int, pp: int, dp: int, zero_stage: int, micro_batch: int, grad_accum: int,
                 seq_len: int, recompute: bool, overhead: float, net: Interconnect | None = None,
                 efficiency: float = 0.6, peak_flops: float = H100_BF16_FLOPS, overlapped_dp: bool = True) -> StepPrediction:
    """Predicted seconds per optimizer step of a layout (bf16 weights and gradients on the wire).

    compute: the model FLOPs of this GPU's share of the global batch at ``efficiency`` of
    ``peak_flops`` (kernel efficiency: what the GEMMs and attention reach, not MFU), times
    ``1 + overhead`` (recompute, pipeline bubble). Communication: the bytes of
    :func:`dp_minimum`, :func:`tp_difftron` (× :data:`SP_OVER_NO_SP` with sequence parallelism,
    assumed whenever TP > 1) and :func:`pp_bytes`, scaled by what ``tools.bench comm`` measured,
    over ``net``. TP and PP traffic is exposed. DP: DeepSpeed ZeRO-1/2 at PP=1 with the issue-16
    config reduces during the last micro-batch's backward (hidden up to that backward's length,
    2/3 of a micro-batch's compute), and all-gathers the weights after the step (exposed);
    ZeRO-3 prefetches weights during compute (hidden up to the compute time); at most
    ``net.overlap`` of overlapped traffic is hidden; PP > 1 or
    ``overlapped_dp=False`` (the config before issue 16): all exposed. MFU = model FLOPs /
    (step time · peak) per GPU."""
    from tools.plan import stage_params

    net = net or Interconnect()
    gpus = tp * pp * dp
    model_flops = cfg.flops_per_token(seq_len) * seq_len * micro_batch * grad_accum * dp / gpus
    compute = model_flops / (peak_flops * efficiency) * (1 + overhead)
    psi = max(stage_params(cfg, tp, pp, s) for s in range(pp))
    d = dp_minimum(psi, dp, zero_stage, 2, 2, grad_accum)
    scale = DP_MEASURED_OVER_MINIMUM if overlapped_dp else DP_BEFORE_OVER_MINIMUM
    dp_grad, dp_param = d["grad"] * scale, d["param"]
    tokens = seq_len * micro_batch
    tp_b = tp_difftron(tokens, cfg.d_model, cfg.n_layers // pp, tp, 2, grad_accum, 0.5 * tokens)
    tp_b *= SP_OVER_NO_SP if tp > 1 else 1.0
    pp_b = pp_bytes(tokens, cfg.d_model, 2, grad_accum, pp)
    comm = step_comm_seconds(dp_bytes=dp_grad + dp_param, tp_bytes=tp_b, pp_bytes_=pp_b, tp=tp, pp=pp, dp=dp,
                             net=net, dp_overlapped=False)
    dp_bw = net.bandwidth(dp_group_span(tp, pp, dp))
    t_grad, t_param = dp_grad / dp_bw, dp_param / dp_bw
    def hidden_behind(t: float, window: float) -> float:  # exposed part of t overlapped with window
        return (1 - net.overlap) * t + max(0.0, net.overlap * t - window)

    if not overlapped_dp or pp > 1 or zero_stage == 0:
        exposed_dp = t_grad + t_param
    elif zero_stage == 3:
        exposed_dp = hidden_behind(t_grad + t_param, compute)
    else:
        exposed_dp = hidden_behind(t_grad, compute / grad_accum * 2 / 3) + t_param
    comm["exposed"] = exposed_dp + comm["tp"] + comm["pp"]
    step = compute + comm["exposed"]
    return StepPrediction(compute, dp_grad + dp_param, tp_b, pp_b, comm, step, model_flops / (step * peak_flops))


def rank_by_step_time(cfg, layouts: list, net: Interconnect | None = None, **kwargs) -> list:
    """``tools.plan`` layouts re-ranked by predicted step time (layouts with memory headroom
    first, then the fastest; ties keep the memory planner's order). Sets ``layout.prediction``."""
    order = {id(lay): i for i, lay in enumerate(layouts)}
    for lay in layouts:
        lay.prediction = predict_step(
            cfg, tp=lay.tp, pp=lay.pp, dp=lay.dp, zero_stage=lay.zero_stage, micro_batch=lay.micro_batch,
            grad_accum=lay.grad_accum, seq_len=lay.seq_len, recompute=lay.recompute,
            overhead=lay.compute_overhead, net=net, **kwargs,
        )
    return sorted(layouts, key=lambda lay: (lay.tight, round(lay.prediction.step_s, 3), order[id(lay)]))


def describe_step_times(layouts: list, *, gpus: int, top: int, net: Interconnect) -> list[str]:
    """The predicted step time, MFU and communication of the first ``top`` layouts."""
    lines = [
        f"predicted step time on {gpus} H100s (compute at 60 % of bf16 peak; NVLink {net.nvlink_gbps:g} GB/s, "
        f"InfiniBand {net.ib_gbps:g} GB/s per GPU, {net.gpus_per_node} GPUs per node; docs/communication.md):",
        "  rank  tp  pp   dp  zero  mbs  compute s  DP GB  TP GB  PP GB  exposed comm s  step s   MFU",
    ]
    for i, lay in enumerate(layouts[:top], 1):
        p = lay.prediction
        lines.append(
            f"  {i:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.zero_stage:>5} {lay.micro_batch:>4} {p.compute_s:>10.2f}"
            f" {p.dp_bytes / 1e9:>6.1f} {p.tp_bytes / 1e9:>6.1f} {p.pp_bytes / 1e9:>6.2f} {p.comm['exposed']:>15.2f}"
            f" {p.step_s:>7.2f} {p.mfu * 100:>5.1f}%"
        )
    return lines
