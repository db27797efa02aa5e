"""``python -m tools.bench eval``: evaluation throughput of a (random) model.

- continuations scored per second by the Monte-Carlo likelihood (``mc_num`` samples each);
- generated tokens per second by LLaDA's reverse process (steps = gen_length by default).

Defaults: the tiny config (configs/model/tiny.yaml), CPU, fp32. On a GPU pass ``--device cuda``
(and e.g. ``--model configs/model/llada_8b.yaml --dtype bf16`` for the real size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from model.config import ModelConfig
from model.likelihood import mc_loglikelihood
from model.llada import build_model
from model.sampling import generate
from tools.loading import parse_dtype

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.bench eval", description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default=str(REPO / "configs" / "model" / "tiny.yaml"), help="model config yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=16, help="likelihood requests")
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--continuation-length", type=int, default=16)
    p.add_argument("--mc-num", type=int, default=32)
    p.add_argument("--mc-batch-size", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4, help="prompts generated together")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: gen-length")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions (best is reported)")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    raw = yaml.safe_load(Path(args.model).read_text())
    config = ModelConfig.from_dict(raw.get("model", raw))
    model = build_model(config, seed=0, device=args.device).to(parse_dtype(args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    low = 3  # skip the special ids 0..2
    requests = [
        (torch.randint(low, config.vocab_size, (args.context_length,), generator=g).tolist(),
         torch.randint(low, config.vocab_size, (args.continuation_length,), generator=g).tolist())
        for _ in range(args.requests)
    ]
    t_ll = best_time(lambda: mc_loglikelihood(model, requests, mc_num=args.mc_num, batch_size=args.mc_batch_size),
                     args.repeats, args.device)
    prompts = torch.randint(low, config.vocab_size, (args.prompts, args.prompt_length), generator=g).tolist()
    steps = args.steps or args.gen_length
    t_gen = best_time(lambda: generate(model, prompts, gen_length=args.gen_length, steps=steps,
                                       block_length=args.block_length, temperature=1.0, seed=0),
                      args.repeats, args.device)
    result = {
        "device": args.device, "dtype": args.dtype, "model": Path(args.model).name,
        "params": config.num_params(), "threads": torch.get_num_threads(),
        "likelihood": {"requests": args.requests, "context": args.context_length,
                       "continuation": args.continuation_length, "mc_num": args.mc_num,
                       "mc_batch_size": args.mc_batch_size, "seconds": round(t_ll, 4),
                       "continuations_per_s": round(args.requests / t_ll, 3)},
        "generation": {"prompts": args.prompts, "prompt_length": args.prompt_length, "gen_length": args.gen_length,
                       "steps": steps, "block_length": args.block_length, "seconds": round(t_gen, 4),
                       "generated_tokens_per_s": round(args.prompts * args.gen_length / t_gen, 2)},
    }
    print(f"likelihood: {result['likelihood']['continuations_per_s']} continuations/s "
          f"(mc_num={args.mc_num}, {args.context_length}+{args.continuation_length} tokens)")
    print(f"generation: {result['generation']['generated_tokens_per_s']} tokens/s "
          f"(batch {args.prompts}, gen_length {args.gen_length}, steps {steps}, block {args.block_length})")
    print(json.dumps(result))
    return 0
