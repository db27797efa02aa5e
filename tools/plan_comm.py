"""Communication per optimizer step: the minimum bytes a layout must move, the bytes difftron's
DeepSpeed/megatron path moves (measured by ``python -m tools.bench comm``), and an interconnect
model that turns them into time (NVLink inside a node, InfiniBand between nodes).

All byte counts are per rank and per optimizer step, under the ring algorithms' accounting of
``train.collectives`` (all-reduce ``2·S·(n-1)/n``, reduce-scatter / all-gather ``S·(n-1)/n``,
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
