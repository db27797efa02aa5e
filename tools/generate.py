"""``python -m tools.generate --checkpoint PATH --prompt "..." [--prompt ...] [options]``.

Samples text with LLaDA's reverse process (``model.sampling.generate``) from a training run,
checkpoint or HF export folder, and prints one completion per prompt. Prompts of different
lengths are batched with left padding (correct attention masks and positions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def complete(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    options: GenerationConfig,
    *,
    stop: Sequence[str] = (),
    add_bos: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[str]:
    """Completions of ``prompts`` (strings): generate, cut at the first EOS/EoT token, decode
    without special tokens, cut at the first ``stop`` string. Prompts longer than
    ``max_length − gen_length`` tokens are truncated from the left. Batches of ``batch_size``
    prompts; the seed of batch i is ``seed + i`` (each row's noise is keyed by (seed, row))."""
    options.validate()
    cfg = model.config
    eot_id = special_token_id(tokenizer, EOT_TOKEN)
    stop_ids = [cfg.eos_token_id] + ([eot_id] if eot_id is not None else [])
    encoded = encode_prompts(tokenizer, prompts, cfg.bos_token_id if add_bos else None)
    limit = (max_length or cfg.max_sequence_length) - options.gen_length
    if limit < 1:
        raise ValueError(f"gen_length ({options.gen_length}) leaves no room for a prompt in max_length {max_length or cfg.max_sequence_length}")
    encoded = [ids[-limit:] for ids in encoded]
    texts = []
    for i in range(0, len(encoded), batch_size):
        out = generate(
            model, encoded[i : i + batch_size],
            gen_length=options.gen_length, steps=options.steps, block_length=options.block_length,
            temperature=options.temperature, cfg_scale=options.cfg_scale, remasking=options.remasking,
            logits_eos_inf=options.logits_eos_inf, confidence_eos_eot_inf=options.confidence_eos_eot_inf,
            eot_id=eot_id, seed=seed + i // batch_size,
        )
        for row in out[:, -options.gen_length:].tolist():
            text = tokenizer.decode(completion_ids(row, stop_ids), skip_special_tokens=True)
            texts.append(cut_at_stop_strings(text, stop))
    return texts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or HF export folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--gen-length", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--steps", type=int, default=None, help="reverse-process steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel-noise temperature; 0 = argmax")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance weight (0 = off)")
    p.add_argument("--remasking", choices=REMASKING, default="low_confidence")
    p.add_argument("--logits-eos-inf", action="store_true", help="never sample EOS")
    p.add_argument("--confidence-eos-eot-inf", action="store_true", help="commit EOS/EoT last (confidence 0)")
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
    )
    try:
        options.validate()
        model, tokenizer = load_for_inference(args.checkpoint, device=args.device, dtype=args.dtype)
        texts = complete(model, tokenizer, args.prompt, options, stop=args.stop, add_bos=args.add_bos,
                         seed=args.seed, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, text in zip(args.prompt, texts):
        print(f"=== {prompt}")
        print(prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
