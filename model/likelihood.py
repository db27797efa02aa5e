"""Monte-Carlo estimates of LLaDA's likelihood bound (paper Eq. 6 / Eq. 14, ``get_log_likelihood.py``).

For a prompt p and a continuation r of L tokens:

    log p(r | p) >= − E_{l ~ U{1..L}} E_{S ⊂ r, |S| = l} [ (L / l) · Σ_{i∈S} −log p_θ(r_i | p, r with S masked) ]

:func:`mc_loglikelihood` estimates the right side with ``mc_num`` samples per request: the
number of masked tokens is stratified (sample j masks ``l_j = ((k − 1 + ⌊j·L/n⌋) mod L) + 1``
tokens with one ``k ~ U{1..L}`` per request, so each ``l_j`` is marginally uniform and the
estimate is unbiased; LLaDA's float linspace + round(half-to-even) can bias it slightly), the
masked positions are uniform without replacement and only on the continuation, each sample is
weighted L/l. Optional classifier-free guidance: ``logits = un + (w+1)(cond − un)`` with the prompt
replaced by the mask token in the unconditional copy. :func:`exact_loglikelihood` computes the
same expectation by enumerating every mask pattern (tiny L only; for tests).

Noise is keyed by ``(seed, request tokens)``, so a request's estimate does not depend on the
batch it is in, its order, or the number of ranks. Samples of many requests are packed into
micro-batches of ``batch_size`` rows (right-padded, with an attention mask). ``llada_batches=True``
samples and batches exactly as LLaDA instead (per request, a fresh k and LLaDA's rounded
linspace per mini-batch, no padding). As in LLaDA's code, the softmax covers every logit the
model returns (the embedding's padding rows too; ``restrict_vocab`` drops them) and CFG and
cross-entropy run in the model's dtype (``fp32`` for float32).

:func:`suffix_greedy` is lm-eval's ``is_greedy`` as LLaDA's adapter computes it.

:func:`fixed_noise_bound` is the in-training evaluation: the pretraining bound per token with
masks keyed by (seed, row), identical at every call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.objective import (
    EPS,
    draw_noise,
    forward_process,
    keyed_generator,
    masked_token_losses,
)


@dataclass
class _Row:
    request: int
    tokens: list[int]
    prompt_len: int
    masked: list[int]  # absolute positions of the masked continuation tokens
    weight: float  # L / l


def stratified_mask_counts(k: int, length: int, num: int) -> torch.Tensor:
    """``num`` mask counts in ``{1..length}``, evenly spread from the start ``k ∈ {1..length}``:
    ``((k − 1 + ⌊j·L/num⌋) mod L) + 1``. With k uniform, each count is uniform on {1..L}."""
    offsets = torch.div(torch.arange(num) * length, num, rounding_mode="floor")
    return (k - 1 + offsets) % length + 1


def llada_mask_counts(k: int, length: int, num: int) -> torch.Tensor:
    """LLaDA's rule for one mini-batch of ``num`` rows: ``round(linspace(k, k + (num−1)·L/num))``
    in float32 (round half to even), wrapped into {1..L}. Slightly biased for some (L, num)."""
    x = torch.round(torch.linspace(float(k), k + (num - 1) * (length / num), steps=num)).long()
    return (x - 1) % length + 1


def _sample_rows(request: int, prompt: list[int], cont: list[int], mc_num: int, seed: int,
                 group: int | None = None) -> list[_Row]:
    """``mc_num`` rows of one request. ``group=None``: one k stratifies all mc_num counts
    (unbiased). ``group=b``: LLaDA's sampling, a fresh k and :func:`llada_mask_counts` per
    mini-batch of b rows."""
    length = len(cont)
    g = keyed_generator(seed, "likelihood", *prompt, -1, *cont)
    if group is None:
        k = int(torch.randint(1, length + 1, (), generator=g))
        counts = stratified_mask_counts(k, length, mc_num).tolist()
    else:
        counts = []
        while len(counts) < mc_num:
            k = int(torch.randint(1, length + 1, (), generator=g))
            counts += llada_mask_counts(k, length, min(group, mc_num - len(counts))).tolist()
    tokens = prompt + cont
    rows = []
    for count in counts:
        chosen = torch.randperm(length, generator=g)[:count]
        rows.append(_Row(request, tokens, len(prompt), sorted(len(prompt) + int(i) for i in chosen), length / count))
    return rows


def masked_logprobs(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    masked: torch.Tensor,
    prompt_lens: torch.Tensor,
    mask_id: int,
    vocab_size: int | None = None,
    cfg_scale: float = 0.0,
    fp32: bool = False,
) -> torch.Tensor:
    """``log p_θ(x_i | x with `masked` replaced by MASK)`` at the masked positions, flattened in
    row-major order (``[masked.sum()]``, returned in fp32). ``tokens``/``masked`` are ``[B, S]``;
    with ``cfg_scale > 0`` an unconditional copy also masks positions before ``prompt_lens``.
    As LLaDA: the softmax covers every logit the model returns and CFG and cross-entropy run in
    the logits' dtype; ``vocab_size`` keeps only ``[..., :vocab_size]`` (drops the embedding's
    padding rows) and ``fp32`` computes both in float32."""
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    if cfg_scale > 0:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        un = torch.where(positions[None] < prompt_lens[:, None], torch.full_like(tokens, mask_id), noisy)
        inputs = torch.cat([noisy, un])
        attn = None if attention_mask is None else attention_mask.repeat(2, 1)
        sel = masked.repeat(2, 1)
    else:
        inputs, attn, sel = noisy, attention_mask, masked
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        logits = model.head(model.hidden_states(inputs, attn)[sel])
    else:
        logits = model(inputs, attention_mask=attn)[sel]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if fp32:
        logits = logits.float()
    if cfg_scale > 0:
        cond, uncond = logits.chunk(2)
        logits = uncond + (cfg_scale + 1) * (cond - uncond)
    return -F.cross_entropy(logits, tokens[masked], reduction="none").float()


def _score_rows(model, rows: list[_Row], mask_id: int, vocab_size: int | None, cfg_scale: float,
                fp32: bool = False) -> list[float]:
    """Weighted log-probability sum ``(L/l)·Σ_{i∈S} log p(x_i | ...)`` of each row."""
    device = next(model.parameters()).device
    width = max(len(r.tokens) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.bool)
    masked = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r.tokens)] = torch.tensor(r.tokens)
        attn[i, : len(r.tokens)] = True
        masked[i, r.masked] = True
    prompt_lens = torch.tensor([r.prompt_len for r in rows])
    attention_mask = None if bool(attn.all()) else attn.to(device)
    logp = masked_logprobs(
        model, tokens.to(device), attention_mask, masked.to(device), prompt_lens.to(device),
        mask_id, vocab_size, cfg_scale, fp32,
    )
    row_of = masked.nonzero(as_tuple=True)[0].to(device)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add(0, row_of, logp.double())
    return [float(s) * r.weight for s, r in zip(sums.tolist(), rows)]


@torch.no_grad()
def mc_loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    seed: int = 0,
    return_samples: bool = False,
    llada_batches: bool = False,
    restrict_vocab: bool = False,
    fp32: bool = False,
) -> list[float] | tuple[list[float], list[list[float]]]:
    """LLaDA's Monte-Carlo lower bound on ``log p(continuation | prompt)`` for each request.

    Args:
        requests: ``(prompt_ids, continuation_ids)`` pairs; continuations must be non-empty.
        mc_num: samples per request (LLaDA: 128; 1 suffices for single-token answers).
        batch_size: rows per forward pass (samples of several requests are packed together).
        cfg_scale: classifier-free guidance weight w (0 = off).
        mask_id: defaults to ``model.config.mask_token_id``.
        seed: keys the noise together with each request's tokens.
        return_samples: also return each request's ``mc_num`` per-sample values.
        llada_batches: LLaDA's sampling and batching: each request alone (no padding), in
            mini-batches of ``batch_size`` rows, each with its own k and LLaDA's rounded
            linspace of mask counts (:func:`llada_mask_counts`). Default: one unbiased
            stratification over all ``mc_num`` rows, rows of several requests packed together.
        restrict_vocab: the softmax over ids below ``vocab_size`` only (LLaDA: every logit).
        fp32: CFG and log-softmax in float32 (LLaDA: in the model's dtype).
    Returns:
        One estimate per request (a float, the mean of its samples), and with
        ``return_samples`` the per-sample values.
    """
    if mc_num <= 0 or batch_size <= 0:
        raise ValueError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be positive")
    cfg = model.config
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    rows: list[_Row] = []
    for i, (prompt, cont) in enumerate(requests):
        prompt, cont = [int(t) for t in prompt], [int(t) for t in cont]
        if not cont:
            raise ValueError(f"likelihood request {i}: the continuation is empty")
        rows.extend(_sample_rows(i, prompt, cont, mc_num, seed, batch_size if llada_batches else None))
    if llada_batches:  # request by request, in order: LLaDA's mini-batches
        chunks = [rows[b : b + batch_size] for r in range(len(requests))
                  for b in range(r * mc_num, (r + 1) * mc_num, batch_size)]
        chunks = [[row for row in c if row.request == c[0].request] for c in chunks]
    else:
        order = sorted(range(len(rows)), key=lambda j: len(rows[j].tokens))  # similar lengths together
        chunks = [[rows[j] for j in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]
    vocab = cfg.vocab_size if restrict_vocab else None
    values: list[list[float]] = [[] for _ in requests]
    for chunk in chunks:
        for r, v in zip(chunk, _score_rows(model, chunk, mask_id, vocab, cfg_scale, fp32)):
            values[r.request].append(v)
    estimates = [sum(v) / len(v) for v in values]
    return (estimates, values) if return_samples else estimates


@torch.no_grad()
def exact_loglikelihood(
    model: torch.nn.Module,
    prompt: Sequence[int],
    continuation: Sequence[int],
    *,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    batch_size: int = 64,
    restrict_vocab: bool = False,
    fp32: bool = False,
) -> float:
    """The bound the MC estimator targets, by enumerating all ``2^L − 1`` mask patterns:
    ``(1/L) Σ_l (L/l) · mean_{|S|=l} Σ_{i∈S} log p(r_i | p, r_S masked)``. Tiny L only (L <= 12)."""
    length = len(continuation)
    if not 1 <= length <= 12:
        raise ValueError(f"exact_loglikelihood enumerates 2^L patterns; L must be in [1, 12], got {length}")
    cfg = model.config
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    prompt, cont = [int(t) for t in prompt], [int(t) for t in continuation]
    total = 0.0
    for count in range(1, length + 1):
        rows = [
            _Row(0, prompt + cont, len(prompt), [len(prompt) + i for i in subset], length / count)
            for subset in itertools.combinations(range(length), count)
        ]
        scores = []
        for b in range(0, len(rows), batch_size):
            scores.extend(_score_rows(model, rows[b : b + batch_size], mask_id,
                                      cfg.vocab_size if restrict_vocab else None, cfg_scale, fp32))
        total += sum(scores) / len(scores) / length
    return total


@torch.no_grad()
def suffix_greedy(
    model: torch.nn.Module,
    prompt: Sequence[int],
    continuation: Sequence[int],
    *,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
) -> bool:
    """lm-eval's ``is_greedy`` the way LLaDA's adapter checks it (``suffix_greedy_prediction``):
    start from ``[prompt | MASK × L]``; at each of L steps take the argmax at every masked
    position (with CFG when ``cfg_scale > 0``, as the likelihood uses), keep only the one with the
    highest softmax confidence (fp32) and commit it; True if the result is the continuation.
    Stops at the first committed token that differs (same answer, fewer forward passes)."""
    cfg = model.config
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    device = next(model.parameters()).device
    prompt, target = [int(t) for t in prompt], torch.tensor([int(t) for t in continuation], device=device)
    length = len(target)
    if length == 0:
        return True
    x = torch.full((1, len(prompt) + length), mask_id, dtype=torch.long, device=device)
    x[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    is_prompt = torch.arange(x.shape[1], device=device) < len(prompt)
    for _ in range(length):
        masked = x[0] == mask_id
        if cfg_scale > 0:
            un = torch.where(is_prompt, torch.full_like(x[0], mask_id), x[0])[None]
            cond, uncond = model(torch.cat([x, un])).chunk(2)
            logits = (uncond + (cfg_scale + 1) * (cond - uncond))[0, masked]
        else:
            logits = model(x)[0, masked]
        x0 = logits.argmax(dim=-1)
        confidence = torch.gather(torch.softmax(logits.float(), dim=-1), -1, x0[:, None]).squeeze(-1)
        best = torch.sort(confidence, descending=True).indices[0]
        position = masked.nonzero()[best, 0]
        x[0, position] = x0[best]
        committed = int(x0[best])
        if committed != mask_id and position >= len(prompt) and committed != int(target[position - len(prompt)]):
            return False  # a committed token is final (a committed MASK stays eligible)
    return bool(torch.equal(x[0, len(prompt):], target))


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows covering ``tokens`` for a model of context
    ``max_length``: the first continuation follows ``[prefix_id]``; each later one is conditioned
    on as many preceding tokens as fit (so every token is scored exactly once)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    tokens = [int(t) for t in tokens]
    windows = []
    start = 0
    chunk = max(1, max_length // 2)  # later windows: half context, half continuation
    first = max_length - 1
    while start < len(tokens):
        size = first if start == 0 else chunk
        cont = tokens[start : start + size]
        ctx = [prefix_id] if start == 0 else tokens[max(0, start - (max_length - len(cont))) : start]
        windows.append((ctx, cont))
        start += len(cont)
    return windows


def loglikelihood_rolling(
    model: torch.nn.Module,
    tokens: Sequence[int],
    *,
    prefix_id: int | None = None,
    max_length: int | None = None,
    **kwargs,
) -> float:
    """A lower bound on ``log p(tokens)``: the sum of the MC bounds of its :func:`rolling_windows`
    (chain rule; each window's bound is conditioned on the text before it). ``kwargs`` go to
    :func:`mc_loglikelihood`."""
    cfg = model.config
    prefix_id = cfg.bos_token_id if prefix_id is None else prefix_id
    max_length = cfg.max_sequence_length if max_length is None else max_length
    if not tokens:
        return 0.0
    return sum(mc_loglikelihood(model, rolling_windows(tokens, prefix_id, max_length), **kwargs))


@torch.no_grad()
def fixed_noise_bound(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seed: int,
    eps: float = EPS,
    sample_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pretraining loss of each sequence, per token, with fixed noise (in-training eval).

    ``Σ_{masked} CE / p_mask / S`` for ``input_ids [B, S]``, where t and the masks of row b are
    drawn by ``model.objective.draw_noise`` keyed only by ``(seed, sample_index[b])`` (default
    ``sample_index = arange(B)``; unstratified t), so every call sees the same masks. Its mean
    over a held-out set is an upper bound on the NLL per token (nats). Returns ``[B]`` fp32.
    """
    batch, seq_len = input_ids.shape
    if sample_index is None:
        sample_index = torch.arange(batch)
    noise = draw_noise(seed, 0, sample_index.cpu(), seq_len, global_batch_size=2**62, eps=eps, stratified=False)
    noise = noise.to(input_ids.device)
    noisy, masked = forward_process(input_ids, noise, model.config.mask_token_id)
    logits = model(noisy)
    return masked_token_losses(logits, input_ids, masked, noise.p_mask) / seq_len


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of independent values."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return math.sqrt(var / n)
