"""``python -m tools.generate --checkpoint PATH --prompt "..." [--prompt ...] [options]``.

Samples text with LLaDA's reverse process (``model.sampling.generate``) from a training run,
checkpoint or HF export folder, and prints one completion per prompt. Prompts of different
lengths are batched with left padding (correct attention masks and positions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from model.sampling import REMASKING, GenerationConfig, completion_ids, cut_at_stop_strings, generate
from tools.loading import load_for_inference, special_token_id

EOT_TOKEN = "<|eot_id|>"


def encode_prompts(tokenizer, texts: Sequence[str], bos_id: int | None) -> list[list[int]]:
    """Token ids of each prompt (no special tokens added by the tokenizer), with ``bos_id`` first
    when given."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(([bos_id] if bos_id is not None else []) + list(ids))
    return out


def finish_text(tokenizer, generated: Sequence[int], stop: Sequence[str] = (), *,
                stop_ids: Sequence[int] = (), stop_at_eos: bool = False) -> str:
    """The text of generated ids. Default (LLaDA's ``eval_llada.py``): decode keeping special
    tokens, cut at the first ``stop`` string, then re-tokenize and decode without special tokens,
    so text after an EOS survives unless a stop string comes first. ``stop_at_eos`` (ours): cut
    the ids at the first of ``stop_ids`` (EOS/EoT), decode without special tokens, cut at ``stop``."""
    generated = [int(t) for t in generated]
    if stop_at_eos:
        text = tokenizer.decode(completion_ids(generated, stop_ids), skip_special_tokens=True)
        return cut_at_stop_strings(text, stop)
    text = cut_at_stop_strings(tokenizer.decode(generated, skip_special_tokens=False), stop)
    return tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)


def complete_ids(
    model: torch.nn.Module,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    options: GenerationConfig,
    *,
    stop: Sequence[str] = (),
    stop_at_eos: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[str]:
    """Completions of already-encoded prompts: generate, then :func:`finish_text`. Prompts longer
    than ``max_length − gen_length`` tokens are truncated from the left. Batches of ``batch_size``
    prompts (left-padded); the seed of batch i is ``seed + i`` (each row's noise is keyed by
    (seed, row))."""
    options.validate()
    cfg = model.config
    eot_id = special_token_id(tokenizer, EOT_TOKEN)
    stop_ids = [cfg.eos_token_id] + ([eot_id] if eot_id is not None else [])
    limit = (max_length or cfg.max_sequence_length) - options.gen_length
    if limit < 1:
        raise ValueError(f"gen_length ({options.gen_length}) leaves no room for a prompt in max_length {max_length or cfg.max_sequence_length}")
    encoded = [list(ids)[-limit:] for ids in encoded]
    texts = []
    for i in range(0, len(encoded), batch_size):
        out = generate(model, encoded[i : i + batch_size], **asdict(options), eot_id=eot_id,
                       seed=seed + i // batch_size)
        for row in out[:, -options.gen_length:].tolist():
            texts.append(finish_text(tokenizer, row, stop, stop_ids=stop_ids, stop_at_eos=stop_at_eos))
    return texts


def complete(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    options: GenerationConfig,
    *,
    stop: Sequence[str] = (),
    stop_at_eos: bool = False,
    add_bos: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[str]:
    """Completions of ``prompts`` (strings, encoded without special tokens, BOS first with
    ``add_bos``): see :func:`complete_ids` and :func:`finish_text`."""
    encoded = encode_prompts(tokenizer, prompts, model.config.bos_token_id if add_bos else None)
    return complete_ids(model, tokenizer, encoded, options, stop=stop, stop_at_eos=stop_at_eos, seed=seed,
                        batch_size=batch_size, max_length=max_length)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or HF export folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--gen-length", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--steps", type=int, default=None, help="reverse-process steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel-noise temperature; 0 = argmax")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance weight (0 = off)")
    p.add_argument("--remasking", choices=REMASKING, default=GenerationConfig.remasking)
    p.add_argument("--logits-eos-inf", action="store_true", help="never sample EOS")
    p.add_argument("--confidence-eos-eot-inf", action="store_true",
                   help="LLaDA's flag: at T=0 EOS/EoT picks get confidence 0 and the others are renormalized "
                        "without them; at T>0 only EoT (see model/sampling.py)")
    p.add_argument("--confidence-eos-eot-zero", action="store_true",
                   help="ours: EOS/EoT picks get confidence 0 at every temperature and remasking")
    p.add_argument("--restrict-vocab", action="store_true",
                   help="ours: never sample the mask token or the embedding's padding rows")
    p.add_argument("--confidence-fp64", action="store_true", help="ours: confidence softmax in float64")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="ours: cut each completion at its first EOS/EoT token (LLaDA keeps text after it)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--add-bos", action="store_true", help="prepend the BOS token to each prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = GenerationConfig(
        gen_length=args.gen_length,
        steps=args.steps or args.gen_length,
        block_length=args.block_length or args.gen_length,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
        remasking=args.remasking,
        logits_eos_inf=args.logits_eos_inf,
        confidence_eos_eot_inf=args.confidence_eos_eot_inf,
        restrict_vocab=args.restrict_vocab,
        confidence_eos_eot_zero=args.confidence_eos_eot_zero,
        confidence_fp64=args.confidence_fp64,
    )
    try:
        options.validate()
        model, tokenizer = load_for_inference(args.checkpoint, device=args.device, dtype=args.dtype)
        texts = complete(model, tokenizer, args.prompt, options, stop=args.stop, stop_at_eos=args.stop_at_eos,
                         add_bos=args.add_bos, seed=args.seed, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, text in zip(args.prompt, texts):
        print(f"=== {prompt}")
        print(prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
