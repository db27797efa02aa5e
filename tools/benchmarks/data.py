"""``python -m tools.bench data``: data.prepare vs a naive baseline, the loader's tokens/s, and its
start-up time and memory against the number of documents.

1. prepare: the embedded corpus (repeated ``--repeat`` times) written as JSON lines, tokenized
   into shards by ``data.prepare`` with ``--workers`` 1 and N, and by a naive baseline
   (``datasets.load_dataset('json')`` + ``Dataset.map`` with the same fast tokenizer + numpy
   concatenation + one ``.bin`` write), all single-threaded per process
   (``TOKENIZERS_PARALLELISM=false``). Reported: tokens/s of wall time, tokens/s per core
   (tokens / wall s / processes tokenizing) and tokens per CPU-second (user+sys of this process
   and its children), and the ratio prepare / naive.
2. loader: ``Loader.batch`` over the prepared shards (memory-mapped, warmed up by a first pass)
   at ``--seq-len`` values, tokens/s in one process.
3. scale: synthetic shard sets of ``--scale-docs`` documents (1,667 per shard, sparse ``.bin``,
   real ``.idx``): the one-off index build (a fresh process, as the first rank of a node), then a
   fresh rank (dp 8) starting a train and a validation loader from the cached index: start-up
   wall and CPU time, RSS growth after start-up and after 200 steps, new file descriptors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


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


# ----- the loader at 2T-token scale: synthetic shard sets, start-up and memory ----------------------

def write_synthetic_tokenizer(folder: Path, eos_id: int, size: int = 256) -> str:
    """A word-level tokenizer (``t0`` ... ``t255``) saved in ``folder``, as every shard directory
    carries its tokenizer; the same for every synthetic set whatever its ``vocab_size``, so synthetic
    sets mix (nothing decodes their ids). Returns its fingerprint for the manifest."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data.shards import tokenizer_fingerprint

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos_id}")
    fast.save_pretrained(str(folder))
    return tokenizer_fingerprint(fast)


def write_shard_dir(
    root, doc_lengths: list[np.ndarray], *, vocab_size: int = 1000, seed: int = 0, kind: str = "pretrain",
    eos_id: int = 1, sparse: bool = False, prompt_lengths: list[np.ndarray] | None = None,
) -> Path:
    """A complete shard directory with one shard per entry of ``doc_lengths`` (int arrays, > 0)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
    rng = np.random.default_rng(seed)
    shards, total_tokens, total_docs = [], 0, 0
    zero_sums: dict[int, str] = {}
    for k, lengths in enumerate(doc_lengths):
        lengths = np.asarray(lengths, dtype=np.int64)
        name = f"shard_{k:05d}"
        offsets = np.zeros(len(lengths) + 1, dtype="<i8")
        np.cumsum(lengths, out=offsets[1:])
        n = int(offsets[-1])
        idx_bytes = offsets.tobytes()
        with open(os.path.join(root, f"{name}.idx"), "wb") as f:
            f.write(idx_bytes)
        sums = {"idx": hashlib.sha256(idx_bytes).hexdigest()}
        if sparse:  # all-zero tokens; shards of one size share one sparse file (hard links: cheap to make)
            if n not in zero_sums:
                with open(root / f"zeros_{n}.sparse", "wb") as f:
                    f.truncate(n * dtype.itemsize)
                zero_sums[n] = hashlib.sha256(bytes(n * dtype.itemsize)).hexdigest()
            os.link(root / f"zeros_{n}.sparse", root / f"{name}.bin")
            sums["bin"] = zero_sums[n]
        else:
            tokens = rng.integers(2, vocab_size, size=n).astype(dtype)
            tokens[offsets[1:] - 1] = eos_id
            data = tokens.tobytes()
            (root / f"{name}.bin").write_bytes(data)
            sums["bin"] = hashlib.sha256(data).hexdigest()
        if kind == "sft":
            plen = np.asarray(prompt_lengths[k], dtype="<i4")
            (root / f"{name}.plen").write_bytes(plen.tobytes())
            sums["plen"] = hashlib.sha256(plen.tobytes()).hexdigest()
        shards.append({"name": name, "tokens": n, "documents": len(lengths), "first_record": total_docs,
                       "end_record": total_docs + len(lengths), "bad_records": 0, "empty_records": 0, "sha256": sums})
        total_tokens += n
        total_docs += len(lengths)
    manifest = {
        "format": "difftron-token-shards", "version": 1, "kind": kind, "dtype": dtype.str, "vocab_size": vocab_size,
        "eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": None, "mask_token_id": None,
        "tokenizer_fingerprint": write_synthetic_tokenizer(root / "tokenizer", eos_id),
        "tokenizer": "tokenizer", "tokenizer_source": "synthetic",
        "source": {"synthetic": seed}, "shard_tokens": 0, "shards": shards, "records_consumed": total_docs,
        "total_tokens": total_tokens, "total_documents": total_docs, "bad_records": 0, "empty_records": 0,
        "complete": True,
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, root / "manifest.json")
    return root


def even_lengths(num_shards: int, docs: int, seed: int = 0, mean: int = 40):
    """Random document lengths (8..2·mean-8, then evened out) summing to ``docs * mean`` in every shard."""
    rng = np.random.default_rng(seed)
    total = docs * mean
    for _ in range(num_shards):
        n = rng.integers(8, 2 * mean - 8, size=docs)
        diff = total - int(n.sum())
        n += diff // docs
        n[: diff % docs] += 1
        assert int(n.sum()) == total and n.min() >= 1
        yield n


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``) in MB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def loader_probe(root: str, rank, dp, max_open, steps, out: str, cache_dir: str | None = None) -> None:
    """Start a train and a validation loader as data-parallel rank ``rank`` of ``dp`` (rank -1: only
    build the index, as the first rank of a node does), take ``steps`` steps, and write start-up
    time, CPU time, RSS growth and new file descriptors to ``out`` (JSON). Run it in a fresh process."""
    rank, dp, max_open, steps = int(rank), int(dp), int(max_open), int(steps)
    import torch  # noqa: F401  (imported by the trainer anyway; not the loader's memory)

    from data.config import DataConfig, SourceConfig
    from data.loader import build_loader

    cfg = DataConfig(sources=[SourceConfig(path=root)], max_open_shards=max_open, cache_dir=cache_dir)
    gbs, seq = 64, 64
    try:  # reset the peak (VmHWM) so that it measures the loaders, not the imports above
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0, fds0, cpu0, t0 = rss_mb(), open_fds(), time.process_time(), time.perf_counter()
    make = lambda split: build_loader(cfg, seq_len=seq, global_batch_size=gbs, dp_rank=max(rank, 0), dp_size=dp, seed=1, split=split)  # noqa: E731
    train = make("train")
    if rank < 0:
        result = {"build_s": time.perf_counter() - t0, "build_cpu_s": time.process_time() - cpu0,
                  "build_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0}
        Path(out).write_text(json.dumps(result))
        return
    val = make("validation")
    startup, startup_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss1 = rss_mb()
    max_fds = 0
    for s in range(steps):
        b = train.batch(s)
        assert b["input_ids"].shape == (gbs // dp, seq)
        if s % 100 == 0:
            val.batch(s // 100)
        max_fds = max(max_fds, open_fds() - fds0)
    rss2 = rss_mb()
    Path(out).write_text(json.dumps({
        "rank": rank, "startup_s": startup, "startup_cpu_s": startup_cpu, "rss_before_mb": rss0,
        "rss_loader_mb": rss1 - rss0, "rss_after_steps_mb": rss2 - rss0, "rss_peak_mb": rss_mb("VmHWM") - rss0, "max_new_fds": max_fds,
        "open_shards": train.open_files() + val.open_files(), "num_samples": train.num_samples(),
        "val_samples": val.num_samples(), "steps": steps,
    }))


def run_probe(args: list, timeout: int = 3600) -> dict:
    """:func:`loader_probe` in a fresh process (``args`` after ``root``..``steps``); returns its JSON."""
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    args = [str(a) for a in args]
    code = "import sys; from tools.benchmarks.data import loader_probe; loader_probe(*sys.argv[1:])"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *args[:5], out, *args[5:]], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"loader probe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    try:
        return json.loads(Path(out).read_text())
    finally:
        os.remove(out)


def bench_scale(docs: int, work: Path, docs_per_shard: int = 1667, ranks: int = 8, steps: int = 200) -> dict:
    """Start-up time and memory of the loader over a synthetic set of ``docs`` documents."""
    shards = -(-docs // docs_per_shard)
    root = work / f"scale_{docs}"
    t0 = time.perf_counter()
    write_shard_dir(root, even_lengths(shards, docs_per_shard), sparse=True, vocab_size=50_000)
    made = time.perf_counter() - t0
    build = run_probe([root, -1, ranks, 64, 0])
    first = run_probe([root, 0, ranks, 64, steps])
    return {"documents": shards * docs_per_shard, "shards": shards, "write_s": made, **build,
            **{k: v for k, v in first.items() if k not in ("num_samples", "val_samples")}}


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
    p.add_argument("--parts", default="prepare,scale", help="comma-separated: prepare (prepare vs naive, loader tokens/s), scale (loader start-up and memory vs documents)")
    p.add_argument("--scale-docs", default="1000000,10000000,50000000", help="document counts of the synthetic shard sets (1,667 per shard)")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))

    from data.corpus import iter_documents, train_tokenizer
    from data.prepare import prepare

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="difftron_bench_data"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    try:
        if "scale" in parts:
            for docs in [int(x) for x in args.scale_docs.split(",") if x]:
                r = bench_scale(docs, work)
                results[f"scale_{docs}"] = r
                print(
                    f"{r['documents']:,} documents in {r['shards']:,} shards: index build {r['build_s']:.1f}s ({r['build_cpu_s']:.1f} CPU-s, "
                    f"+{r['build_peak_rss_mb']:.0f} MB peak); rank start-up (train + validation loaders, cached index) "
                    f"{r['startup_s']:.2f}s ({r['startup_cpu_s']:.2f} CPU-s), loader RSS +{r['rss_loader_mb']:.0f} MB, "
                    f"+{r['rss_after_steps_mb']:.0f} MB after {r['steps']} steps (peak +{r['rss_peak_mb']:.0f} MB), max new fds {r['max_new_fds']}"
                )
                shutil.rmtree(work / f"scale_{docs}", ignore_errors=True)
        if "prepare" not in parts:
            if args.json:
                print(json.dumps(results))
            return 0
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
                m, wall, cpu = _timed(lambda out=out, workers=workers: prepare([str(jsonl)], str(out), tokenizer=tok_dir, workers=workers, progress=False))
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
