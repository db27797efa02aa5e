"""``python -m tools.bench overhead``: difftron's training step time / a plain PyTorch loop's, on CPU.

Both sides train the same model (identical initial weights), on the same token batches, with the
same AdamW settings (decay on matrices only, foreach), gradient clipping at 1.0, the same
micro-batch split and the same masked-diffusion loss (``Σ_masked CE / p_mask``, ``1/(G·L)``):

- **difftron**: ``train.trainer.Trainer.train_step`` (keyed stratified noise per sample, forward
  process, micro-batches, learning-rate schedule, ``LocalEngine.train_step`` with its per-sample
  losses and grad norm, the loss-by-t buckets and the step's metrics). The data loader is replaced
  by the in-memory batches both sides share (a Trainer is built without ``__init__``; see
  ``difftron_trainer``), so loader cost is not part of the ratio;
- **plain**: a hand-written loop: ``torch.rand`` noise, ``torch.where`` masking, forward (the head
  at the masked positions only, like the single-process engine),
  cross-entropy at masked positions, backward per micro-batch, ``clip_grad_norm_``, ``step``,
  ``zero_grad``, ``loss.item()``.

Steps alternate between the two (the order flips each round) and the ratio of the medians is
printed with the median of per-round ratios; target <= 1.10. ``--profile`` prints the top
functions of the difftron step (cProfile, cumulative time).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.llada import build_model
from train.config import LoggingConfig, RunConfig, TrainConfig
from train.local_engine import LocalEngine
from train.trainer import Trainer, objective_of

TARGET = 1.10
OPT = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def bench_config(args) -> ModelConfig:
    v = args.vocab
    return ModelConfig(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
        mlp_hidden_size=args.ffn, vocab_size=v, embedding_size=v, max_sequence_length=args.seq,
        mask_token_id=v - 1, eos_token_id=v - 2, pad_token_id=v - 2, bos_token_id=v - 3,
    )


class MemoryBatches:
    """Stands in for ``data.loader``: ``batch(step)`` -> ``{"input_ids" [G, S], "sample_index" [G]}``."""

    def __init__(self, tokens: list[torch.Tensor]) -> None:
        self.tokens = tokens

    def batch(self, step: int) -> dict:
        ids = self.tokens[step % len(self.tokens)]
        g = ids.shape[0]
        return {"input_ids": ids, "sample_index": step * g + torch.arange(g)}


def difftron_trainer(model, config: ModelConfig, args, loader: MemoryBatches) -> Trainer:
    """A ``Trainer`` with the attributes ``train_step`` uses, built without ``__init__`` (which
    would need shards, a tokenizer and an output folder)."""
    cfg = RunConfig(
        model=config,
        train=TrainConfig(
            max_steps=10**6, seq_len=args.seq, micro_batch_size=args.micro_batch, global_batch_size=args.batch,
            lr=OPT["lr"], weight_decay=OPT["weight_decay"], betas=list(OPT["betas"]), adam_eps=OPT["eps"],
            grad_clip=1.0, warmup_steps=0, random_length_prob=0.0, precision="fp32", device="cpu",
        ),
        logging=LoggingConfig(wandb="disabled", progress_bar=False),
    )
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = cfg
    trainer.world_size = 1
    trainer.device = torch.device("cpu")
    trainer.out_dir = Path("runs/bench-overhead")  # nothing is written there
    trainer.is_logging_rank = False  # no event files
    trainer.length_multiple = 1  # no sequence parallelism
    trainer.objective = objective_of(cfg.train, cfg.model.mask_token_id, 1)
    trainer.init_run_state()
    trainer.loader = loader
    trainer.engine = LocalEngine(
        model, lr=OPT["lr"], weight_decay=OPT["weight_decay"], betas=OPT["betas"], eps=OPT["eps"],
        grad_clip=1.0, precision="fp32", device=torch.device("cpu"),
    )
    return trainer


class PlainLoop:
    """The loop one would write by hand for the same model, data, loss and optimizer."""

    def __init__(self, model, config: ModelConfig, args, loader: MemoryBatches) -> None:
        self.model, self.loader, self.args = model, loader, args
        self.mask_id = config.mask_token_id
        decay = [p for p in model.parameters() if p.ndim >= 2]
        other = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
            lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"], foreach=True,
        )
        self.gen = torch.Generator().manual_seed(0)
        self.step_no = 0

    def step(self) -> float:
        ids = self.loader.batch(self.step_no)["input_ids"]
        self.step_no += 1
        g, s = ids.shape
        t = torch.rand(g, generator=self.gen)
        p_mask = (1 - 1e-3) * t + 1e-3
        masked = torch.rand(g, s, generator=self.gen) < p_mask[:, None]
        noisy = torch.where(masked, self.mask_id, ids)
        self.model.train()
        total = 0.0
        for lo in range(0, g, self.args.micro_batch):
            sl = slice(lo, lo + self.args.micro_batch)
            m = masked[sl]
            # the head at the masked positions only, as the engines' loss (model.objective.masked_logits)
            logits = self.model.head(self.model.hidden_states(noisy[sl])[m])
            ce = F.cross_entropy(logits, ids[sl][m], reduction="none")
            rows = m.nonzero(as_tuple=True)[0]
            loss = (ce / p_mask[sl][rows]).sum() / (g * s)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m tools.bench overhead", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="cProfile the difftron steps and print the top functions")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.batch % args.micro_batch:
        print(f"error: --batch ({args.batch}) must be a multiple of --micro-batch ({args.micro_batch})", file=sys.stderr)
        return 2
    try:
        config = bench_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    loader = MemoryBatches([torch.randint(0, args.vocab - 3, (args.batch, args.seq), generator=g) for _ in range(4)])
    model = build_model(config, seed=0)
    trainer = difftron_trainer(copy.deepcopy(model), config, args, loader)
    plain = PlainLoop(copy.deepcopy(model), config, args, loader)
    sides = {"difftron": trainer.train_step, "plain": plain.step}
    for _ in range(args.warmup):
        for fn in sides.values():
            fn()
    times = {k: [] for k in sides}
    profiler = cProfile.Profile() if args.profile else None
    for r in range(args.rounds):
        for name in (("difftron", "plain") if r % 2 == 0 else ("plain", "difftron")):
            if profiler is not None and name == "difftron":
                profiler.enable()
            start = time.perf_counter()
            out = sides[name]()
            times[name].append(time.perf_counter() - start)
            if profiler is not None and name == "difftron":
                profiler.disable()
            loss = out["loss"] if isinstance(out, dict) else out
            if not math.isfinite(loss):
                print(f"error: {name} step produced a non-finite loss", file=sys.stderr)
                return 1
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["difftron"] / med["plain"]
    per_round = statistics.median(a / b for a, b in zip(times["difftron"], times["plain"]))
    print(
        f"overhead bench: CPU ({torch.get_num_threads()} threads); model {config.n_layers} layers d={config.d_model} "
        f"heads={config.n_heads} swiglu={config.mlp_hidden_size} vocab={config.vocab_size}, seq {args.seq}, "
        f"global batch {args.batch} in micro-batches of {args.micro_batch}, fp32, AdamW + clip 1.0; "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up"
    )
    print(f"difftron step (Trainer.train_step + LocalEngine): median {med['difftron'] * 1e3:.4g} ms")
    print(f"plain PyTorch loop: median {med['plain'] * 1e3:.4g} ms")
    print(f"overhead ratio: {ratio:.3f} (median of per-round ratios {per_round:.3f}; target <= {TARGET:.2f})")
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
