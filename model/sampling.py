"""LLaDA's reverse process (``generate.py`` of ML-GSAI/LLaDA, paper §2.4, Alg. 4-5), as pure functions.

    x = [prompt | gen_length × MASK]
    for each block of ``block_length`` positions, left to right (semi-autoregressive when
    block_length < gen_length; pure diffusion when equal):
        split the block's masked count evenly over steps_per_block = steps / num_blocks steps
        (the remainder goes to the earliest steps: LLaDA's ``get_num_transfer_tokens``)
        each step:
            logits = model(x)                                  full forward, no cache
            [CFG]  logits = un + (w + 1)·(cond − un)           un: the prompt replaced by MASK
            [logits_eos_inf] EOS logit := −inf
            x0 = argmax(exp(logits) / (−log u)^T)              Gumbel-max in float64; T=0: argmax
            [confidence_eos_eot_inf] see below
            confidence = softmax(logits)[x0]  (low_confidence, in the logits' dtype) or U(0, 1) (random)
            commit the k most confident masked positions left of the block's end (top-k over the row)

With the defaults the output is token for token LLaDA's at temperature 0 (and the same
distribution at T > 0), including its fine points:

- x0 is an argmax over every logit the model returns (the embedding's padding rows and the mask
  token included), so a ``[MASK]`` can be "committed"; it then stays eligible, in later blocks too.
  Masks in the prompt are filled as well (eligible from the first block on).
- ``confidence_eos_eot_inf`` acts after x0 is chosen. At temperature 0 it removes EOS and EoT from
  the logits before the softmax: an EOS/EoT pick gets confidence 0 and every other confidence is
  renormalized without them. At T > 0 only EoT is removed (LLaDA writes the EOS −inf into the
  noisy copy, which is not read again). Under ``random`` remasking it changes nothing.
- The confidence softmax runs in the logits' dtype (bf16 for a bf16 model) and top-k runs over
  the whole row (−inf outside the eligible positions), so exact ties break as LLaDA's do.

Options (all off by default) for what we consider better behaviour:

- ``restrict_vocab``: the logits of the embedding's padding rows (ids >= ``vocab_size``) and of
  the mask token are −inf, so neither can be sampled and no ``[MASK]`` is left in the output.
- ``confidence_eos_eot_zero``: an EOS/EoT pick gets confidence 0 at every temperature and under
  both remaskings, without renormalizing the others (EOS/EoT are committed last).
- ``confidence_fp64``: the confidence softmax in float64 (fewer exact ties in bf16).

Differences from the reference code that do not change the output:

- Only the logits of the positions that can be committed are computed (the current block, plus
  any earlier position still masked), so the Gumbel noise is drawn only there.
- Noise comes from one generator per row, keyed by ``(seed, row)``: a prompt's output does not
  depend on the other prompts in the batch or on their padding.
- Batches of prompts of different lengths are LEFT-padded; padded keys are masked out of
  attention and RoPE positions start at 0 on each prompt's first real token, so padding does not
  change any prompt's output (LLaDA's own code gives a padded prompt shifted positions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.objective import key_seed

REMASKING = ("low_confidence", "random")


@dataclass
class GenerationConfig:
    """Options of :func:`generate` (LLaDA's names and defaults, except ``mask_id`` / ``eos_id``
    which default to the model config's; the last three are ours, off by default)."""

    gen_length: int = 128
    steps: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    restrict_vocab: bool = False
    confidence_eos_eot_zero: bool = False
    confidence_fp64: bool = False

    def validate(self) -> int:
        """Checks the options; returns steps per block."""
        if self.gen_length <= 0 or self.steps <= 0 or self.block_length <= 0:
            raise ValueError(
                f"gen_length ({self.gen_length}), steps ({self.steps}) and block_length "
                f"({self.block_length}) must be positive"
            )
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})"
            )
        num_blocks = self.gen_length // self.block_length
        if self.steps % num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks "
                f"(gen_length / block_length = {num_blocks})"
            )
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        return self.steps // num_blocks


def left_pad(
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    pad_id: int,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads prompts into ``(input_ids [B, P], attention_mask [B, P])``.

    ``prompts`` is a list of token-id lists, or a ``[B, P]`` tensor whose real tokens are given by
    ``attention_mask`` (any padding side; it is re-packed to the left).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if attention_mask is None:
            rows = [r.tolist() for r in prompts]
        else:
            rows = [r[m.bool()].tolist() for r, m in zip(prompts, attention_mask.to(prompts.device))]
        device = prompts.device if device is None else device
    else:
        rows = [list(map(int, r)) for r in prompts]
    if not rows:
        raise ValueError("generate: no prompts given")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[B, S]`` that start at 0 on each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: ``[B, L]`` masked flags -> ``[B, steps]`` counts that
    split each row's masked count evenly, the remainder going to the earliest steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    counts = base.expand(-1, steps).clone()
    counts += (torch.arange(steps, device=mask_index.device)[None, :] < remainder).long()
    return counts


def add_gumbel_noise(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor | None) -> torch.Tensor:
    """LLaDA's Gumbel-max trick in float64: ``exp(logits) / (−log u)^T`` (argmax of it samples
    softmax(logits / T)). ``temperature == 0`` returns the logits (argmax decoding)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    gumbel_noise = (-torch.log(uniforms)) ** temperature
    return logits.exp() / gumbel_noise


def block_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    start: int,
    end: int,
) -> torch.Tensor:
    """Logits ``[B, end-start, E]`` of positions ``start:end`` of ``x`` (a full forward; only the
    needed rows go through the LM head when the model exposes ``hidden_states``/``head``)."""
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        h = model.hidden_states(x, attention_mask, position_ids)
        return model.head(h[:, start:end])
    return model(x, attention_mask=attention_mask, position_ids=position_ids)[:, start:end]


def row_generators(seed: int, batch: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, keyed by ``(seed, row)``, on ``device``."""
    gens = []
    for row in range(batch):
        g = torch.Generator(device=device)
        g.manual_seed(key_seed(seed, "generate", row))
        gens.append(g)
    return gens


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    eos_id: int | None = None,
    eot_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    restrict_vocab: bool = False,
    confidence_eos_eot_zero: bool = False,
    confidence_fp64: bool = False,
    seed: int | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Samples ``gen_length`` tokens after each prompt with LLaDA's reverse process.

    Args:
        model: maps ``(input_ids [B,S], attention_mask, position_ids) -> logits [B,S,E]``; its
            ``config`` supplies ``vocab_size``, ``mask_token_id``, ``eos_token_id``,
            ``pad_token_id`` where the arguments are None.
        prompts: a list of B token-id lists (any lengths), or a ``[B, P]`` tensor (with
            ``attention_mask`` ``[B, P]`` marking real tokens when rows are padded).
        gen_length, steps, block_length, temperature, cfg_scale, remasking,
        logits_eos_inf, confidence_eos_eot_inf: as in LLaDA's ``generate`` (see module doc).
        eot_id: the end-of-turn id that ``confidence_eos_eot_inf`` also covers (LLaDA: 126348).
        restrict_vocab, confidence_eos_eot_zero, confidence_fp64: our options (module doc).
        seed: keys the per-row noise; None draws one from torch's global RNG.
        callback: called as ``callback(block, step, x)`` after every step (``x`` is ``[B, P+G]``).
    Returns:
        ``[B, P + gen_length]`` long tensor: the LEFT-padded prompts (pads = ``pad_token_id``)
        followed by the generated tokens; ``out[:, -gen_length:]`` is the generation.
    """
    config = GenerationConfig(
        gen_length, steps, block_length, temperature, cfg_scale, remasking, logits_eos_inf,
        confidence_eos_eot_inf, restrict_vocab, confidence_eos_eot_zero, confidence_fp64,
    )
    steps_per_block = config.validate()
    cfg = model.config
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    stop_ids = [eos_id] + ([eot_id] if eot_id is not None else [])
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, cfg.pad_token_id, attention_mask, device=device)
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + gen_length
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    gens = row_generators(seed, batch, device)

    x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    full_mask = torch.cat([prompt_mask, torch.ones(batch, gen_length, dtype=torch.long, device=device)], dim=1)
    position_ids = positions_from_mask(full_mask)
    attn = None if bool(full_mask.all()) else full_mask.bool()
    if cfg_scale > 0:
        attn2 = None if attn is None else attn.repeat(2, 1)
        pos2 = position_ids.repeat(2, 1)
    # LLaDA's CFG masks the prompt's non-mask tokens (pads are masked out of attention anyway)
    prompt_index = torch.zeros(batch, total, dtype=torch.bool, device=device)
    prompt_index[:, :prompt_len] = x[:, :prompt_len] != mask_id

    for block in range(gen_length // block_length):
        start = prompt_len + block * block_length
        end = start + block_length
        counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for step in range(steps_per_block):
            # LLaDA: every masked position left of the block's end can be committed (prompt
            # masks, masks committed as tokens in earlier blocks); usually just the block's
            eligible = x[:, :end] == mask_id
            before = eligible[:, :start].any(0).nonzero()
            lo = int(before[0]) if len(before) else start
            if cfg_scale > 0:
                un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
                both = block_logits(model, torch.cat([x, un_x]), attn2, pos2, lo, end)
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = block_logits(model, x, attn, position_ids, lo, end).clone()
            if restrict_vocab:
                logits = restrict_logits(logits, cfg.vocab_size, [mask_id])
            if logits_eos_inf:
                logits[..., eos_id] = -torch.inf
            if temperature > 0:
                uniforms = _row_draws(gens, lo, start, end, (logits.shape[-1],), device)
            else:
                uniforms = None
            x0 = add_gumbel_noise(logits, temperature, uniforms).argmax(dim=-1)  # [B, end - lo]
            if confidence_eos_eot_inf:
                # LLaDA's `logits_with_noise[..., EOS] = logits[..., EoT] = -inf`, after x0: at
                # T = 0 both names are the same tensor, at T > 0 only EoT reaches the softmax
                removed = stop_ids if temperature == 0 else stop_ids[1:]
                for token in removed:
                    logits[..., token] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64) if confidence_fp64 else logits, dim=-1)
                confidence = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                confidence = _row_draws(gens, lo, start, end, (), device)
            if confidence_eos_eot_zero:
                stop = torch.isin(x0, torch.tensor(stop_ids, device=device))
                confidence = torch.where(stop, torch.zeros_like(confidence), confidence)
            window = eligible[:, lo:end]
            x0 = torch.where(window, x0, x[:, lo:end])
            row_confidence = torch.full((batch, total), -torch.inf, dtype=confidence.dtype, device=device)
            row_confidence[:, lo:end] = torch.where(window, confidence, torch.full_like(confidence, -torch.inf))
            transfer = torch.zeros_like(x, dtype=torch.bool)
            for row in range(batch):
                k = int(counts[row, step])
                if k > 0:
                    transfer[row, torch.topk(row_confidence[row], k=k).indices] = True
            x[:, lo:end] = torch.where(transfer[:, lo:end], x0, x[:, lo:end])
            if callback is not None:
                callback(block, step, x)
    return x


def _row_draws(gens, lo: int, start: int, end: int, shape: tuple, device) -> torch.Tensor:
    """Float64 uniforms ``[B, end - lo, *shape]`` from each row's generator: the block's
    positions ``start:end`` are drawn first (so the usual case draws only them), then ``lo:start``."""
    rows = []
    for g in gens:
        block = torch.rand(end - start, *shape, generator=g, device=device, dtype=torch.float64)
        if lo < start:
            earlier = torch.rand(start - lo, *shape, generator=g, device=device, dtype=torch.float64)
            block = torch.cat([earlier, block])
        rows.append(block)
    return torch.stack(rows)


def restrict_logits(logits: torch.Tensor, vocab_size: int, banned: Sequence[int] = ()) -> torch.Tensor:
    """Drops the embedding's padding rows (``[..., :vocab_size]``) and sets ``banned`` ids to −inf."""
    logits = logits[..., :vocab_size].clone()
    for token in banned:
        logits[..., token] = -torch.inf
    return logits


def completion_ids(generated: Sequence[int], stop_ids: Sequence[int] = ()) -> list[int]:
    """The generated tokens up to (not including) the first of ``stop_ids`` (e.g. EOS / EoT)."""
    out = []
    for t in generated:
        if t in stop_ids:
            break
        out.append(int(t))
    return out


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
    """The text up to the earliest occurrence of any stop string (lm-eval's ``until``)."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
