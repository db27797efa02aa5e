"""``python -m tools.bench layouts``: optimizer-step time per parallel layout, as a ratio to the
single-process LocalEngine, on CPU (gloo) with a small model.

Each layout is one ``torchrun --standalone`` launch of this module in worker mode
(``OMP_NUM_THREADS=1`` per rank). The worker trains ``--warmup`` + ``--steps`` steps with the
same data and keyed noise in every layout and reports the median step time; the reference is
``train.local_engine.LocalEngine`` with one thread. On a 2-core machine, layouts with more than 2 ranks
are oversubscribed, so their ratios measure overhead, not speed-up.

Layout names: ``single`` (LocalEngine), ``tp{T}_pp{P}_z{Z}[_ac-MODE]`` with dp = ranks/(T·P),
given as ``NAME@RANKS`` (e.g. ``tp1_pp1_z2@2``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_LAYOUTS = [
    "tp1_pp1_z0@1",
    "tp1_pp1_z0@2",
    "tp1_pp1_z1@2",
    "tp1_pp1_z2@2",
    "tp1_pp1_z3@2",
    "tp2_pp1_z0@2",
    "tp1_pp2_z1@2",
    "tp2_pp1_z1@4",
    "tp1_pp2_z1@4",
    "tp2_pp2_z1@4",
]
SEED, GLOBAL_BATCH, MICRO_BATCH = 0, 8, 2


def bench_model_config(args):
    from model.config import ModelConfig

    return ModelConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=8, n_kv_heads=4,
        mlp_hidden_size=2 * args.d_model, vocab_size=1024, embedding_size=1024,
        max_sequence_length=args.seq_len, mask_token_id=1023, eos_token_id=1022,
        pad_token_id=1022, bos_token_id=1021,
    )


def step_batch(step: int, config, seq_len: int):
    import torch

    from model.objective import draw_noise, forward_process
    from train.engine import MicroBatch

    g = GLOBAL_BATCH
    tokens = torch.randint(0, 1000, (g, seq_len), generator=torch.Generator().manual_seed(step))
    noise = draw_noise(SEED, step, step * g + torch.arange(g), seq_len, g)
    noisy, masked = forward_process(tokens, noise, config.mask_token_id)
    return MicroBatch(noisy, tokens, masked, noise.p_mask, torch.full((g,), 1.0 / (g * seq_len)))


def micro_batches(batch, rows: range):
    from train.engine import MicroBatch

    return [
        MicroBatch(*(getattr(batch, f)[s : s + MICRO_BATCH] for f in batch.__dataclass_fields__))
        for s in range(rows.start, rows.stop, MICRO_BATCH)
    ]


def worker(args) -> None:
    """Runs inside torchrun (or alone for ``single``); writes ``{"ms": [...]}`` from rank 0."""
    import torch

    torch.set_num_threads(1)
    config = bench_model_config(args)
    opt = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)
    if args.layout == "single":
        from model.llada import build_model
        from train.local_engine import LocalEngine

        engine = LocalEngine(build_model(config, SEED), precision="fp32", device=torch.device("cpu"), **opt)
        rows, barrier, rank = range(GLOBAL_BATCH), (lambda: None), 0
    else:
        import torch.distributed as dist

        from train.layout import ParallelConfig
        from train.parallel_engine import build_parallel_engine

        m = re.fullmatch(r"tp(\d+)_pp(\d+)_z(\d)(?:_ac-([a-z]+))?", args.layout)
        if not m:
            raise ValueError(f"layouts: bad layout name {args.layout!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        engine = build_parallel_engine(
            config, ParallelConfig(tp=int(m[1]), pp=int(m[2]), zero_stage=int(m[3])), world_size=world,
            seed=SEED, precision="fp32", micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH,
            activation_checkpointing=m[4] or "none", **opt,
        )
        per = GLOBAL_BATCH // engine.dp_size
        rows, rank = range(engine.dp_rank * per, (engine.dp_rank + 1) * per), dist.get_rank()
        barrier = dist.barrier
    times = []
    for step in range(args.warmup + args.steps):
        mbs = micro_batches(step_batch(step, config, args.seq_len), rows)
        barrier()
        start = time.perf_counter()
        engine.train_step(mbs, 1e-3)
        barrier()
        times.append(1000 * (time.perf_counter() - start))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"ms": times[args.warmup :]}, f)


LAYOUT_NAME = re.compile(r"(single|tp\d+_pp\d+_z\d(?:_ac-(?:none|selective|full))?)(?:@\d+)?")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_layout(name: str, args) -> float:
    layout, _, ranks = name.partition("@")
    ranks = int(ranks or 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        common = [
            "--worker", "--layout", layout, "--out", out, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--d-model", str(args.d_model), "--n-layers", str(args.n_layers),
            "--seq-len", str(args.seq_len),
        ]
        if layout == "single":
            cmd = [sys.executable, "-m", "tools.benchmarks.layouts", *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "tools.benchmarks.layouts", *common]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if not _cuda_available():
            env["DS_ACCELERATOR"] = "cpu"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"layout {name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        with open(out) as f:
            return statistics.median(json.load(f)["ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench layouts", description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help="comma-separated NAME@RANKS")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    layouts = [n.strip() for n in args.layouts.split(",") if n.strip()]
    bad = [n for n in layouts if not LAYOUT_NAME.fullmatch(n)]
    if bad:
        print(f"error: --layouts: bad layout name(s) {', '.join(bad)}; use e.g. tp2_pp1_z1@4", file=sys.stderr)
        return 2
    print(
        f"model d_model={args.d_model} n_layers={args.n_layers} seq={args.seq_len} global batch "
        f"{GLOBAL_BATCH} micro-batch {MICRO_BATCH}, fp32, CPU/gloo, OMP_NUM_THREADS=1 per rank; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    try:
        base = run_layout("single", args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'layout':<22}{'ranks':>6}{'ms/step':>10}{'ratio':>8}")
    print(f"{'single (LocalEngine)':<22}{1:>6}{base:>10.1f}{1.0:>8.2f}")
    for name in layouts:
        try:
            ms = run_layout(name, args)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        layout, _, ranks = name.partition("@")
        print(f"{layout:<22}{int(ranks or 1):>6}{ms:>10.1f}{ms / base:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
