"""``python -m tools.bench data``: data.prepare vs a naive baseline, and the loader's tokens/s.

1. prepare: the embedded corpus (repeated ``--repeat`` times) written as JSON lines, tokenized
   into shards by ``data.prepare`` with ``--workers`` 1 and N, and by a naive baseline
   (``datasets.load_dataset('json')`` + ``Dataset.map`` with the same fast tokenizer + numpy
   concatenation + one ``.bin`` write), all single-threaded per process
   (``TOKENIZERS_PARALLELISM=false``). Reported: tokens/s of wall time, tokens/s per core
   (tokens / wall s / processes tokenizing) and tokens per CPU-second (user+sys of this process
   and its children), and the ratio prepare / naive.
2. loader: ``Loader.batch`` over the prepared shards (memory-mapped, checksums verified on the
   first touch, excluded by a warm-up step) at ``--seq-len`` values, tokens/s in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0, _cpu_seconds() - c0


def naive_baseline(jsonl: str, tokenizer_dir: str, out_bin: str) -> int:
    """datasets.map + numpy concatenation: the straightforward way; returns the token count."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tok.eos_token_id
    ds = datasets.load_dataset("json", data_files=jsonl, split="train", keep_in_memory=True)
    mapped = ds.map(
        lambda batch: {"ids": [ids + [eos] for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]]},
        batched=True, remove_columns=ds.column_names, load_from_cache_file=False, keep_in_memory=True,
    )
    tokens = np.concatenate([np.asarray(x, dtype=np.uint16) for x in mapped["ids"]])
    tokens.tofile(out_bin)
    return int(tokens.size)


def bench_loader(shards: str, seq_len: int, global_batch: int, steps: int) -> tuple[float, float]:
    """(tokens/s wall, tokens per CPU-second) of Loader.batch in this process."""
    from data.config import DataConfig, SourceConfig
    from data.loader import build_loader

    cfg = DataConfig(sources=[SourceConfig(path=shards)])
    ld = build_loader(cfg, seq_len=seq_len, global_batch_size=global_batch, dp_rank=0, dp_size=1, seed=0)
    total = ld.num_samples()[0]
    for s in range(min(steps, max(1, total // global_batch))):  # warm-up: touch (and verify) every shard, fill the page cache
        ld.batch(s)
    _, wall, cpu = _timed(lambda: [ld.batch(s) for s in range(steps)])
    n = steps * global_batch * seq_len
    return n / wall, n / cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench data", description=__doc__.splitlines()[0])
    p.add_argument("--embedded-bytes", type=int, default=4_000_000, help="size of the embedded corpus")
    p.add_argument("--repeat", type=int, default=2, help="copies of the corpus in the input file")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for the multi-process prepare run")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train the embedded 4096-token BPE)")
    p.add_argument("--seq-lens", default="128,2048", help="comma-separated loader window lengths")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--loader-steps", type=int, default=200)
    p.add_argument("--work-dir", help="keep the files here instead of a temporary directory")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args(argv)

    from data.corpus import iter_documents, train_tokenizer
    from data.prepare import prepare

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="difftron_bench_data"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    try:
        tok_dir = args.tokenizer or train_tokenizer(work / "tokenizer", 4096, max_bytes=args.embedded_bytes)
        jsonl = work / "corpus.jsonl"
        docs = list(iter_documents(args.embedded_bytes))
        with open(jsonl, "w") as f:
            for _ in range(args.repeat):
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        print(f"input: {jsonl.stat().st_size / 1e6:.1f} MB of JSON lines ({len(docs) * args.repeat} documents); tokenizer {tok_dir}")
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            _timed(lambda: naive_baseline(str(jsonl), tok_dir, str(work / "warm.bin")))  # warm caches and imports
            n_naive, wall, cpu = _timed(lambda: naive_baseline(str(jsonl), tok_dir, str(work / "naive.bin")))
            results["naive"] = {"tokens": n_naive, "wall_s": wall, "cpu_s": cpu, "tok_s_per_core": n_naive / wall, "tok_per_cpu_s": n_naive / cpu}
            for workers in sorted({1, args.workers}):
                out = work / f"shards_w{workers}"
                shutil.rmtree(out, ignore_errors=True)
                m, wall, cpu = _timed(lambda: prepare([str(jsonl)], str(out), tokenizer=tok_dir, workers=workers, progress=False))
                n = m["total_tokens"]
                if n != n_naive:
                    print(f"warning: prepare wrote {n} tokens, the naive baseline {n_naive}")
                results[f"prepare_w{workers}"] = {"tokens": n, "wall_s": wall, "cpu_s": cpu, "tok_s": n / wall,
                                                  "tok_s_per_core": n / wall / workers, "tok_per_cpu_s": n / cpu}
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old
        naive = results["naive"]
        print(f"naive (datasets.map + numpy):  {naive['tok_s_per_core'] / 1e6:.3f} M tok/s per core (wall), {naive['tok_per_cpu_s'] / 1e6:.3f} M tok per CPU-s")
        for key, r in results.items():
            if key.startswith("prepare_w"):
                w = int(key[len("prepare_w"):])
                print(
                    f"data.prepare --workers {w}:    {r['tok_s'] / 1e6:.3f} M tok/s, {r['tok_s_per_core'] / 1e6:.3f} M tok/s per core (wall), "
                    f"{r['tok_per_cpu_s'] / 1e6:.3f} M tok per CPU-s; vs naive x{r['tok_s_per_core'] / naive['tok_s_per_core']:.2f} per core (wall), "
                    f"x{r['tok_per_cpu_s'] / naive['tok_per_cpu_s']:.2f} per CPU-s"
                )
        shards = str(work / "shards_w1")
        for seq_len in [int(x) for x in args.seq_lens.split(",") if x]:
            tps, tpc = bench_loader(shards, seq_len, args.global_batch, args.loader_steps)
            results[f"loader_L{seq_len}"] = {"tok_s": tps, "tok_per_cpu_s": tpc}
            print(f"loader seq_len {seq_len}, global batch {args.global_batch}: {tps / 1e6:.2f} M tok/s (one process), {tpc / 1e6:.2f} M tok per CPU-s")
        if args.json:
            print(json.dumps(results))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0
