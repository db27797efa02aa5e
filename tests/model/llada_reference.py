"""LLaDA's reference algorithms, rewritten for the parity tests from the description in
``shared/reference/llada.md`` (§3.3, §4.2, §5 and "Fine points of LLaDA's reference code"); no
code of ML-GSAI/LLaDA is copied. Each function follows the reference step by step, including the
details our implementation could otherwise get subtly wrong (which tensor an EOS/EoT −inf is
written into, the dtype of the confidence softmax, top-k over the whole row, masks that stay
eligible, the EOS padding counted in the SFT answer length)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transfer_counts(block_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step: the block's masked count split evenly, remainder first."""
    total = block_masked.sum(dim=1)
    out = torch.zeros(block_masked.shape[0], steps, dtype=torch.long)
    for row in range(block_masked.shape[0]):
        base, extra = divmod(int(total[row]), steps)
        out[row] = base
        out[row, :extra] += 1
    return out


@torch.no_grad()
def sampler(model, prompt: list[int], *, steps: int, gen_length: int, block_length: int, temperature: float = 0.0,
            cfg_scale: float = 0.0, remasking: str = "low_confidence", mask_id: int, eos_id: int, eot_id: int,
            logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False, first_commits: list | None = None):
    """LLaDA's ``generate`` for one unpadded prompt; returns the generated ids (a list)."""
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[0, : len(prompt)] = torch.tensor(prompt)
    is_prompt = x != mask_id
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        block_end = len(prompt) + (b + 1) * block_length
        counts = transfer_counts(x[:, block_end - block_length : block_end] == mask_id, per_block)
        for i in range(per_block):
            masked = x == mask_id
            if cfg_scale > 0:
                uncond_in = x.clone()
                uncond_in[is_prompt] = mask_id
                cond, uncond = model(torch.cat([x, uncond_in])).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            if temperature == 0:
                noisy = logits  # the very same tensor, as in the reference
            else:
                u = torch.rand(logits.shape, dtype=torch.float64)
                noisy = logits.to(torch.float64).exp() / (-torch.log(u)) ** temperature
            x0 = noisy.argmax(dim=-1)
            if confidence_eos_eot_inf:
                noisy[:, :, eos_id] = -torch.inf
                logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                conf = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x0.shape)
            conf[:, block_end:] = -torch.inf
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
            chosen = torch.topk(conf[0], k=int(counts[0, i])).indices
            if first_commits is not None and not first_commits:
                first_commits.append(sorted((int(j), int(x0[0, j])) for j in chosen))
            x[0, chosen] = x0[0, chosen]
    return x[0, len(prompt):].tolist()


@torch.no_grad()
def suffix_greedy_decode(model, prefix: list[int], length: int, *, cfg_scale: float, mask_id: int) -> list[int]:
    """The sequence LLaDA's ``suffix_greedy_prediction`` builds: ``length`` steps, each committing
    only the most confident argmax among the masked positions (with CFG when ``cfg_scale > 0``)."""
    seq = torch.full((1, len(prefix) + length), mask_id, dtype=torch.long)
    seq[0, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    is_prompt = torch.arange(seq.shape[1]) < len(prefix)
    for _ in range(length):
        masked = seq == mask_id
        if cfg_scale > 0:
            uncond_in = seq.clone()
            uncond_in[is_prompt[None]] = mask_id
            cond, uncond = model(torch.cat([seq, uncond_in])).chunk(2)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        else:
            logits = model(seq)
        logits = logits[masked]
        x0 = logits.argmax(dim=-1)
        conf = torch.gather(torch.softmax(logits.to(torch.float32), dim=-1), -1, x0[:, None]).squeeze(-1)
        order = torch.sort(conf, descending=True).indices
        x0[order[1:]] = mask_id
        seq[masked] = x0.clone()
    return seq[0, len(prefix):].tolist()


def suffix_greedy(model, prefix: list[int], target: list[int], *, cfg_scale: float, mask_id: int) -> bool:
    """LLaDA's ``suffix_greedy_prediction``: is the target what that decoding builds?"""
    return suffix_greedy_decode(model, prefix, len(target), cfg_scale=cfg_scale, mask_id=mask_id) == list(target)


def generate_until_text(tokenizer, generated: list[int], until: list[str]) -> str:
    """LLaDA's ``generate_until`` post-processing of one generation."""
    text = tokenizer.decode(generated, skip_special_tokens=False)
    for stop in until:
        if stop in text:
            text = text.split(stop)[0]
    return tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)


@torch.no_grad()
def sft_loss(model, examples: list[list[int]], prompt_lengths: list[int], t: torch.Tensor, uniforms: torch.Tensor,
             *, eos_id: int, mask_id: int, eps: float = 1e-3) -> torch.Tensor:
    """LLaDA's SFT loss of one mini-batch (GUIDELINES): EOS-pad to the batch's longest example,
    mask with p_mask = (1 − eps)·t + eps (``uniforms < p_mask``; passed in so the noise equals
    ours), restore the prompt, divide each masked CE by p_mask and by the row's answer length
    (EOS padding included), sum, divide by the batch size."""
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), eos_id, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(-1, longest)
    noisy = torch.where(uniforms[:, :longest] < p_mask, torch.full_like(ids, mask_id), ids)
    positions = torch.arange(longest)[None].expand(len(examples), -1)
    prompt_index = positions < torch.tensor(prompt_lengths)[:, None]
    noisy[prompt_index] = ids[prompt_index]
    answer_lengths = (~prompt_index).sum(dim=1, keepdim=True).expand(-1, longest)
    masked = noisy == mask_id
    logits = model(noisy)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") / p_mask[masked]
    return (ce / answer_lengths[masked]).sum() / len(examples)


def mask_counts(k: int, length: int, rows: int) -> list[int]:
    """LLaDA's per-mini-batch mask counts: a float32 linspace from k in steps of L/rows, rounded
    (half to even), wrapped into {1..L}."""
    x = torch.round(torch.linspace(float(k), k + (rows - 1) * (length / rows), steps=rows)).long()
    return (((x - 1) % length) + 1).tolist()


@torch.no_grad()
def loglikelihood(model, prefix: list[int], target: list[int], batches: list[list[list[int]]], *, cfg_scale: float,
                  mask_id: int) -> float:
    """LLaDA's ``get_log_likelihood`` with the mask patterns given (``batches``: per mini-batch,
    per row, the masked positions of the target), so that the noise equals ours."""
    seq = torch.tensor(prefix + target)
    length = len(target)
    losses = []
    for patterns in batches:
        batch = seq[None].repeat(len(patterns), 1)
        is_mask = torch.zeros_like(batch, dtype=torch.bool)
        for row, positions in enumerate(patterns):
            is_mask[row, [len(prefix) + p for p in positions]] = True
        noisy = torch.where(is_mask, torch.full_like(batch, mask_id), batch)
        p_mask = (is_mask.sum(dim=1, keepdim=True) / length).expand(-1, seq.shape[0])
        if cfg_scale > 0:
            uncond_in = noisy.clone()
            uncond_in[:, : len(prefix)] = mask_id
            cond, uncond = model(torch.cat([noisy, uncond_in])).chunk(2)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        else:
            logits = model(noisy)
        loss = F.cross_entropy(logits[is_mask], batch[is_mask], reduction="none") / p_mask[is_mask]
        losses.append(float(loss.sum() / len(patterns)))
    return -sum(losses) / len(losses)
