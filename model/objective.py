"""The masked-diffusion objective (LLaDA / SMDM / MDLM) as small pure functions.

Pretraining (LLaDA Eq. 3, GUIDELINES.md):

    t ~ U(0, 1) per sequence,  p_mask = (1 - eps)·t + eps,  masked_i ~ Bernoulli(p_mask) i.i.d.
    x_t = where(masked, MASK, x_0)
    loss = Σ_{masked} CE(logits_i, x_0,i) / p_mask  /  (batch · seq_len)          (no logit shift)

SFT (LLaDA Eq. 5): the same forward process with the prompt never masked, each sequence's sum
divided by its answer length (prompt excluded, EOS padding included), then averaged over the batch.

Two choices beyond the reference code, both on by default and both switchable:

- **keyed noise**: the noise (t and the per-token uniforms) of a sample is a pure function of
  ``(seed, step, position of the sample in the global batch)``. Any data-parallel split, micro-batch
  split or sample order therefore draws identical masks for the same sample.
- **stratified t**: the global batch of G samples takes one t from each of the G equal-width
  strata of [0, 1) (the strata are shuffled per step), which lowers the variance of the bound's
  estimate without biasing it (each t is still marginally U(0, 1)).

The loss exists once, here, for every engine and test: :func:`forward_process`, the per-row
masked CE :func:`masked_token_losses` (its cross-entropy function is a parameter, so the
tensor-parallel head passes megatron's vocab-parallel one), the row weights :func:`row_weights`
(1/(G·L) pretraining, 1/(G·answer_len) SFT) summed by :func:`weighted_loss`, the run's
:class:`Objective` (pretraining or SFT, chosen once: step length, noise, masks, weights) and the
t-bucket helper (:func:`t_bucket_index`, :func:`bucket_row_stats`) of the loss-by-t metrics and
the step guard.

Convention: a sample's global index is ``step · global_batch_size + j`` with ``j`` its position
in the step's global batch; the data loader produces these indices.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-3


def key_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (a stable hash; Python's ``hash`` is salted)."""
    data = b"".join(
        struct.pack("<q", p) if isinstance(p, int) else p.encode() + b"\0" for p in parts
    )
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def keyed_generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(*parts))


@dataclass
class Noise:
    """The noise of a batch: ``t`` and ``p_mask`` are ``[B]``; ``uniforms`` is ``[B, S]`` and a
    token is masked where ``uniforms < p_mask``."""

    t: torch.Tensor
    p_mask: torch.Tensor
    uniforms: torch.Tensor

    def to(self, device: torch.device | str) -> "Noise":
        return Noise(self.t.to(device), self.p_mask.to(device), self.uniforms.to(device))

    def truncate(self, length: int) -> "Noise":
        return Noise(self.t, self.p_mask, self.uniforms[:, :length])


def time_from_uniform(u: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """p_mask = (1 - eps)·t + eps: the masking probability at diffusion time t."""
    return (1.0 - eps) * u + eps


def stratum_of(seed: int, step: int, positions: torch.Tensor, global_batch_size: int) -> torch.Tensor:
    """Which of the G strata each batch position takes at this step (a per-step shuffle)."""
    perm = torch.randperm(global_batch_size, generator=keyed_generator(seed, step, "strata"))
    return perm[positions]


def draw_noise(
    seed: int,
    step: int,
    sample_index: torch.Tensor,
    seq_len: int,
    global_batch_size: int,
    eps: float = EPS,
    stratified: bool = True,
    keyed: bool = True,
) -> Noise:
    """Noise for the samples ``sample_index`` (``[B]`` global indices) of ``step``.

    ``keyed=True``: each row's draws come from a generator keyed by (seed, step, position in the
    global batch), so they do not depend on how the batch is split. ``keyed=False`` (the usual
    practice, for comparison): one generator keyed by (seed, step, first index) draws the rows in
    order, so the noise depends on the split. Drawn on the CPU, so it is the same on every device
    type; move it with ``Noise.to``.
    """
    positions = sample_index.long() % global_batch_size
    u_t = torch.empty(len(positions), dtype=torch.float64)
    uniforms = torch.empty(len(positions), seq_len, dtype=torch.float32)
    shared = None if keyed else keyed_generator(seed, step, "unkeyed", int(sample_index[0]) if len(sample_index) else 0)
    for row, j in enumerate(positions.tolist()):
        g = keyed_generator(seed, step, j) if keyed else shared
        u_t[row] = torch.rand((), generator=g, dtype=torch.float64)
        uniforms[row] = torch.rand(seq_len, generator=g)
    if stratified:
        t = (stratum_of(seed, step, positions, global_batch_size).double() + u_t) / global_batch_size
    else:
        t = u_t
    t = t.float()
    return Noise(t=t, p_mask=time_from_uniform(t, eps), uniforms=uniforms)


def random_length(seed: int, step: int, seq_len: int, probability: float, multiple_of: int = 1) -> int:
    """LLaDA's 1 % rule: with ``probability`` per step, the whole step trains on a prefix of a
    length drawn uniformly from [1, seq_len]; otherwise on ``seq_len``. The same on every rank.

    ``multiple_of``: round a drawn length down to a multiple of it (at least ``multiple_of``), so
    every layout can run the step (sequence parallelism splits the sequence over the TP ranks:
    ``multiple_of = tp``). The draw itself does not depend on it; 1 leaves lengths as drawn."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    if probability <= 0:
        return seq_len
    g = keyed_generator(seed, step, "length")
    if torch.rand((), generator=g).item() < probability:
        length = int(torch.randint(1, seq_len + 1, (), generator=g).item())
        return min(seq_len, max(multiple_of, length - length % multiple_of))
    return seq_len


def forward_process(
    input_ids: torch.Tensor,
    noise: Noise,
    mask_token_id: int,
    prompt_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask tokens independently with probability p_mask; returns ``(x_t, masked)``.

    With ``prompt_lengths`` (SFT), positions before each row's prompt length are never masked.
    """
    masked = noise.uniforms < noise.p_mask[:, None]
    if prompt_lengths is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        masked = masked & (positions[None, :] >= prompt_lengths[:, None])
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked


def cross_entropy_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` logits, ``[n]`` targets -> ``[n]`` cross-entropies (the default of
    :func:`masked_token_losses`; a vocab-parallel head passes megatron's
    ``vocab_parallel_cross_entropy``, which has this signature)."""
    return F.cross_entropy(logits, targets, reduction="none")


def masked_token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    cross_entropy=cross_entropy_per_token,
) -> torch.Tensor:
    """Per-sample ``Σ_{masked i} CE(logits_i, targets_i) / p_mask`` in fp32, shape ``[B]``.

    ``logits`` is ``[B, S, V]`` (or ``[B, S, V/tp]`` with a vocab-parallel ``cross_entropy``), or
    only the masked positions' ``[n, V]`` in ``masked``'s row-major order (what
    :func:`masked_logits` returns: the head computed at the masked positions alone).
    Cross-entropy is computed only at masked positions (about half of them), never with a shift.
    """
    rows = masked.nonzero(as_tuple=True)[0]
    if logits.dim() == masked.dim() + 1:
        logits = logits[masked]
    ce = cross_entropy(logits.float(), targets[masked])
    per_sample = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    return per_sample.index_add(0, rows, ce / p_mask[rows].float())


def masked_logits(model, input_ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The logits at the masked positions only, ``[n, V]`` in ``masked``'s row-major order: the
    model's hidden states at every position, its output head at the masked ones. The loss needs
    nothing else, and the head (``d × V`` per position) with its log-softmax is the largest
    per-token cost of a small model (docs/demo.md, "The output head at the masked positions only").
    ``model`` has ``hidden_states(input_ids)`` and ``head(x)`` (``model.llada.LLaDAModel``).
    The single-process engine's loss; the parallel engine still computes the vocab-parallel
    head at every position."""
    return model.head(model.hidden_states(input_ids)[masked])


def weighted_loss(per_sample: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """The loss of a (micro-)batch: ``Σ_rows row_weight · per_sample``. With :func:`row_weights`
    the sum over all micro-batches of all data-parallel ranks is the global batch's loss."""
    return (per_sample * row_weight.float()).sum()


def answer_lengths(prompt_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-prompt positions per row (EOS padding included, as LLaDA's SFT counts them)."""
    return (seq_len - prompt_lengths).clamp(min=1)


def row_weights(
    global_batch_size: int, seq_len: int, rows: int, prompt_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss weight of each of ``rows`` rows (fp32 ``[rows]``), for :func:`weighted_loss`.

    Pretraining (``prompt_lengths`` None; LLaDA Eq. 3): ``1 / (G · L)``: every position counts,
    masked or not. SFT (LLaDA Eq. 5): ``1 / (G · answer_length)`` per row (prompt excluded, EOS
    padding included). ``G`` is the global batch, so micro-batch and data-parallel sums add up.
    """
    if prompt_lengths is None:
        return torch.full((rows,), 1.0 / (global_batch_size * seq_len))
    return (1.0 / (global_batch_size * answer_lengths(prompt_lengths, seq_len).double())).float()


@dataclass
class Prepared:
    """A batch after the forward process: what the model sees and what the loss needs."""

    noisy: torch.Tensor  # [B, L] x_t
    targets: torch.Tensor  # [B, L] x_0
    masked: torch.Tensor  # [B, L] bool
    p_mask: torch.Tensor  # [B]
    row_weight: torch.Tensor  # [B] fp32, see row_weights
    t: torch.Tensor  # [B] diffusion times


@dataclass(frozen=True)
class Objective:
    """The training objective of a run, chosen once: ``sft=False`` pretraining (random lengths
    with ``random_length_prob``), ``sft=True`` LLaDA's SFT (prompt never masked, each global batch
    padded to its longest example, answer-length weights). Batches are the data loader's dicts
    (``input_ids``, ``sample_index``; SFT also ``prompt_lengths`` and ``pad_length``)."""

    sft: bool
    seq_len: int
    global_batch_size: int
    mask_token_id: int
    mask_eps: float = EPS
    stratified: bool = True
    keyed: bool = True
    random_length_prob: float = 0.0
    length_multiple: int = 1  # every step length is a multiple of it (sequence parallelism: tp)

    def check_batch(self, batch: dict) -> None:
        if self.sft and "prompt_lengths" not in batch:
            raise ValueError("train.objective=sft needs SFT shards (with prompt lengths); these sources have none")

    def step_length(self, batch: dict, seed: int, step: int) -> int:
        """The step's sequence length. Pretraining: LLaDA's 1 % rule (:func:`random_length`). SFT:
        every row EOS-padded to the global batch's longest example (LLaDA's rule per global
        batch), rounded up to ``length_multiple``."""
        m = self.length_multiple
        if self.sft:
            return min(self.seq_len, -(-int(batch["pad_length"]) // m) * m)
        return random_length(seed, step, self.seq_len, self.random_length_prob, multiple_of=m)

    def judge_spikes(self, length: int) -> bool:
        """Whether a step's loss is comparable with the running statistics (full-length steps;
        every SFT step)."""
        return self.sft or length == self.seq_len

    def prepare(self, batch: dict, seed: int, step: int, length: int) -> Prepared:
        """Noise (keyed by ``(seed, step, sample index)``), masks and row weights of a batch."""
        ids = batch["input_ids"][:, :length]
        noise = draw_noise(
            seed, step, batch["sample_index"], self.seq_len, self.global_batch_size, eps=self.mask_eps,
            stratified=self.stratified, keyed=self.keyed,
        ).truncate(length)
        prompt_lengths = batch.get("prompt_lengths") if self.sft else None
        noisy, masked = forward_process(ids, noise, self.mask_token_id, prompt_lengths)
        weights = row_weights(self.global_batch_size, length, ids.shape[0], prompt_lengths)
        return Prepared(noisy, ids, masked, noise.p_mask, weights, noise.t)


def t_bucket_index(t: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Equal-width bucket of each t in [0, 1] (computed in float64)."""
    return (t.double() * num_buckets).long().clamp(0, num_buckets - 1)


def bucket_row_stats(bucket: torch.Tensor, x: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``[3, num_buckets]`` float64 on the CPU: row count, Σx and Σx² of ``x`` per bucket (for
    loss-by-t metrics and the step guard's spike statistics)."""
    x = x.detach().double().cpu()
    bucket = bucket.cpu()
    out = torch.zeros(3, num_buckets, dtype=torch.float64)
    out[0].index_add_(0, bucket, torch.ones_like(x))
    out[1].index_add_(0, bucket, x)
    out[2].index_add_(0, bucket, x * x)
    return out
