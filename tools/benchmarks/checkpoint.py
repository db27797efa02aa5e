"""``python -m tools.bench checkpoint``: sharded checkpoint save/load rates at 1, 2 and 4 ranks.

For each rank count N (``--ranks``) it launches N processes (torchrun, gloo on CPU) that hold the
training state of a model (fp32 weights + both AdamW moments, ``--d-model`` etc. size it) split
as ZeRO splits it: rank r owns the r-th 1/N flat range of every tensor (described as chunks,
``train.checkpoint.fragment_chunks``). Then, with a barrier before and after each:

- ``save``: ``train.checkpoint.save_checkpoint`` (every rank writes its own file, CRC-32 of its
  chunks, rank 0 the metadata, the rename and ``latest``);
- ``async``: ``train.checkpoint.AsyncSave``: the blocking part (the copy of the rank's chunks to
  CPU) and the total until the write is done;
- ``load``: ``train.checkpoint.load_state`` into fresh buffers (each rank reads its byte ranges and
  checks their CRC-32).

Prints, per N, seconds and GB/s per rank (its own bytes / wall time) and in total (all bytes /
wall time), then projects the save and resume time of the 8B state (96 GB) on 64 ranks from the
largest N's per-rank rates, assuming each rank keeps that rate (storage that scales with the
ranks, as a parallel filesystem does up to its aggregate bandwidth). With ``--hf`` it also times
the single-process HF export and import (``tools.convert_to_hf`` / ``tools.convert_from_hf``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model.config import ModelConfig

STATE_8B_GB, RANKS_8B = 96.0, 64


def bench_config(args) -> ModelConfig:
    return ModelConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.d_model // 64, n_kv_heads=args.d_model // 64,
        mlp_hidden_size=args.mlp_hidden_size, vocab_size=args.vocab_size, embedding_size=args.vocab_size,
        max_sequence_length=2048, mask_token_id=2, eos_token_id=1, pad_token_id=1, bos_token_id=0,
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rank_state(config: ModelConfig, rank: int, world: int) -> dict:
    """This rank's 1/world flat range of every weight and both moments (random fp32), as chunks."""
    import torch

    from model.llada import LLaDAModel
    from train.checkpoint import MODEL_PREFIX, OPTIM_PREFIX, Sharded, fragment_chunks

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LLaDAModel(config).named_parameters()}
    gen = torch.Generator().manual_seed(rank)
    state = {}
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        lo, hi = numel * rank // world, numel * (rank + 1) // world
        for key in (MODEL_PREFIX + name, f"{OPTIM_PREFIX}{name}/exp_avg", f"{OPTIM_PREFIX}{name}/exp_avg_sq"):
            flat = torch.randn(hi - lo, generator=gen)
            state[key] = Sharded(shape, torch.float32, fragment_chunks(flat, shape, lo, (0,) * len(shape)))
    return state


def worker(out_path: str, folder: str, args) -> int:
    """One rank under torchrun: times save, async save and load; rank 0 writes the JSON."""
    import torch
    import torch.distributed as dist

    from train.checkpoint import AsyncSave, Chunk, Sharded, checkpoint_group, load_state, save_checkpoint

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoint_group()
    state = rank_state(bench_config(args), rank, world)
    nbytes = sum(c.tensor.numel() * 4 for v in state.values() for c in v.chunks)
    kwargs = dict(trainer_state={}, config_yaml="", tokenizer_dir=None, keep_last=1, rng=False)

    def around(fn) -> float:
        dist.barrier()
        seconds = timed(fn)
        dist.barrier()
        return seconds

    out = {"bytes": nbytes}
    out["save"] = around(lambda: save_checkpoint(folder, 1, state=state, **kwargs))
    pending: list = []
    dist.barrier()
    start = time.perf_counter()
    pending.append(AsyncSave(folder, 2, state, **kwargs))
    out["async_blocking"] = time.perf_counter() - start
    pending[0].wait()
    dist.barrier()
    out["async_total"] = time.perf_counter() - start
    fresh = {k: Sharded(v.size, v.dtype, [Chunk(c.offsets, c.sizes, torch.empty(c.sizes)) for c in v.chunks])
             for k, v in state.items()}
    ckpt = pending[0].path
    out["load"] = around(lambda: load_state(ckpt, fresh))
    same = all(torch.equal(a.tensor, b.tensor) for k in state for a, b in zip(state[k].chunks, fresh[k].chunks))
    out["load_equal"] = same
    gathered: list = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()
    return 0


def run_ranks(n: int, work: Path, argv: list[str]) -> list[dict]:
    out = work / f"ranks{n}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "tools.benchmarks.checkpoint", "--worker", str(out), "--folder", str(work / f"ckpt{n}"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{n}-rank run failed (rc={proc.returncode}): " + " | ".join(tail))
    return json.loads(out.read_text())


def hf_round_trip(config: ModelConfig, work: Path, max_shard_size: str) -> dict[str, float]:
    from omegaconf import OmegaConf

    from model.llada import build_model
    from tools.convert_from_hf import convert_hf_dir
    from tools.convert_to_hf import convert_checkpoint
    from train.checkpoint import MODEL_PREFIX, save_checkpoint, whole

    state = {MODEL_PREFIX + k: whole(v) for k, v in build_model(config, seed=0).state_dict().items()}
    run = work / "hf-run"
    config_yaml = OmegaConf.to_yaml(OmegaConf.create({"model": config.to_dict()}))
    save_checkpoint(run, 1, state=state, trainer_state={}, config_yaml=config_yaml, tokenizer_dir=None)
    return {
        "export_bf16": timed(lambda: convert_checkpoint(run, work / "hf16", dtype="bf16", max_shard_size=max_shard_size)),
        "import": timed(lambda: convert_hf_dir(work / "hf16", work / "imported")),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m tools.bench checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (default 1,2,4)")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--mlp-hidden-size", type=int, default=2816)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--hf", action="store_true", help="also time the HF export and import (one process)")
    parser.add_argument("--max-shard-size", default="100MB", help="HF export shard size (default 100MB)")
    parser.add_argument("--workdir", default=None, help="folder for the files (default: a temporary folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.folder, args)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
        if not ranks or min(ranks) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --ranks must be positive integers separated by commas, got {args.ranks!r}", file=sys.stderr)
        return 2
    sizing = ["--d-model", str(args.d_model), "--n-layers", str(args.n_layers),
              "--mlp-hidden-size", str(args.mlp_hidden_size), "--vocab-size", str(args.vocab_size)]
    config = bench_config(args)
    state_gb = 3 * config.num_params() * 4 / 1e9
    print(f"state: {config.num_params() / 1e6:.1f}M parameters, {state_gb:.3f} GB (fp32 weights + 2 AdamW moments)")
    print(f"{'ranks':>5} {'op':>14} {'seconds':>9} {'GB/s/rank':>10} {'GB/s total':>11}")
    last = None
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        for n in ranks:
            per = run_ranks(n, work, sizing)
            if not all(r["load_equal"] for r in per):
                print(f"error: the {n}-rank load did not return what was saved", file=sys.stderr)
                return 1
            total = sum(r["bytes"] for r in per) / 1e9
            for op in ("save", "async_blocking", "async_total", "load"):
                seconds = max(r[op] for r in per)
                print(f"{n:>5} {op:>14} {seconds:9.3f} {total / n / seconds:10.3f} {total / seconds:11.3f}")
            last = (n, per, total)
        if args.hf:
            for op, seconds in hf_round_trip(config, work, args.max_shard_size).items():
                print(f"{1:>5} {op:>14} {seconds:9.3f} {state_gb / 3 / seconds:10.3f} {state_gb / 3 / seconds:11.3f}")
    n, per, total = last
    share = STATE_8B_GB / RANKS_8B
    rates = {op: total / n / max(r[op] for r in per) for op in ("save", "async_blocking", "load")}
    print(f"projection, 8B state ({STATE_8B_GB:.0f} GB) on {RANKS_8B} ranks ({share:.2f} GB each) at the "
          f"{n}-rank per-rank rates: save {share / rates['save']:.1f} s, async blocking "
          f"{share / rates['async_blocking']:.1f} s, resume {share / rates['load']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
