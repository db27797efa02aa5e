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


def masked_token_losses(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``Σ_{masked i} CE(logits_i, targets_i) / p_mask`` in fp32, shape ``[B]``.

    Cross-entropy is computed only at masked positions (about half of them), never with a shift.
    """
    rows = masked.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    per_sample = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    return per_sample.index_add(0, rows, ce / p_mask[rows].float())


def pretraining_loss(per_sample: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """LLaDA's normalization: the masked, 1/p_mask-weighted CE summed over the batch, divided by
    ``batch_size · seq_len`` (every position counts, masked or not). ``batch_size`` is the global
    batch when the sum covers one micro-batch of it."""
    return per_sample.sum() / (batch_size * seq_len)


def answer_lengths(prompt_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-prompt positions per row (EOS padding included, as LLaDA's SFT counts them)."""
    return (seq_len - prompt_lengths).clamp(min=1)


def sft_loss(per_sample: torch.Tensor, prompt_lengths: torch.Tensor, seq_len: int, batch_size: int) -> torch.Tensor:
    """LLaDA's SFT normalization: each row's sum divided by its answer length, summed, divided by
    ``batch_size`` (the global batch when the sum covers one micro-batch of it)."""
    return (per_sample / answer_lengths(prompt_lengths, seq_len).to(per_sample)).sum() / batch_size


def t_bucket_sums(
    t: torch.Tensor, values: torch.Tensor, num_buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts of ``values`` by equal-width buckets of t (for loss-by-t metrics)."""
    bucket = (t * num_buckets).long().clamp(0, num_buckets - 1)
    sums = torch.zeros(num_buckets, dtype=torch.float64).index_add(0, bucket.cpu(), values.double().cpu())
    counts = torch.zeros(num_buckets, dtype=torch.float64).index_add(0, bucket.cpu(), torch.ones_like(values, dtype=torch.float64).cpu())
    return sums, counts
