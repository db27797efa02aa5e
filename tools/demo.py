"""``python -m tools.demo``: the end-to-end demo on 2 CPU cores, about 5 minutes of training.

1. prepare the embedded corpus (Python's own sources and docs) into token shards, training a
   small byte-level BPE tokenizer on the way;
2. train the one-block tiny LLaDA of ``configs/demo.yaml`` (3,300 steps), evaluating the bound on
   the validation split (5 % of the documents) at the start, every 550 steps and at the end;
3. draw the run's curves with ``tools.plot`` into ``RUN_DIR/plots``;
4. export the final checkpoint to Hugging Face format (LLaDA's layout, remote code included);
5. sample text from the export with LLaDA's reverse process;
6. print what the run learned, every number read from this run: the validation bound at the
   start and at the end next to unigram references on the same validation tokens (their unigram
   entropy, Miller-Madow estimate, and a unigram model of the training split), the training
   loss of the least- and most-masked t-buckets, the plots and the samples. The same numbers go to
   ``RUN_DIR/demo_summary.json``.

Each step runs the command a user would type; they are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/demo.yaml"
PROMPTS = ("def read_file(path):", "The list type")


def run(args: list[str], *, capture: bool = False) -> str:
    print(f"\n$ python {shlex.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, *args], check=True, stdout=subprocess.PIPE if capture else None, text=True)
    return proc.stdout if capture else ""


UNIGRAM_PRIOR = 0.5  # add-1/2 (Krichevsky-Trofimov) counts: a token the training split lacks still gets mass


def _loader(cfg, split: str):
    from data.loader import build_loader

    t = cfg.train
    return build_loader(cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                        dp_rank=0, dp_size=1, seed=t.seed, split=split)


def unigram_entropy(counts) -> dict:
    """The unigram entropy of a token sample from its counts (nats/token), two estimators:

    - ``plug_in``: ``-sum p log p`` of the sample's own frequencies (the maximum-likelihood
      estimate). It is biased LOW: a sample of N tokens drawn from a distribution with K types
      misses part of the tail and over-fits the rest, by about ``(K - 1) / (2 N)`` nats;
    - ``miller_madow``: ``plug_in + (K - 1) / (2 N)``, K the types seen, which removes that
      first-order bias (Miller 1955). This is the demo's reference.
    """
    import torch

    counts = torch.as_tensor(counts, dtype=torch.float64)
    counts = counts[counts > 0]
    n, k = float(counts.sum()), int(counts.numel())
    p = counts / n
    plug_in = float(-(p * p.log()).sum())
    return {"plug_in": plug_in, "miller_madow": plug_in + (k - 1) / (2 * n), "types": k, "tokens": int(n)}


def unigram_references(cfg) -> dict:
    """The unigram references for the bound, on exactly the validation tokens the in-training
    evaluation scores (its ``eval.batches`` batches):

    - ``unigram_entropy``: the unigram entropy of those tokens, Miller-Madow estimate (see
      ``unigram_entropy``; ``unigram_entropy_plug_in`` is the uncorrected figure). It is the
      entropy of a unigram model fit to the very tokens it is scored on, so it sits below any
      unigram model fit elsewhere;
    - ``unigram_cross_entropy``: nats/token of a unigram model fit on the training split (one epoch
      of its windows, add-1/2 counts over the vocabulary) on those tokens: a held-out score, like
      the bound itself. It exceeds the entropy by the held-out documents' own vocabulary (names,
      topics) that the training split's frequencies do not share.
    """
    import torch

    vocab = cfg.model.vocab_size
    val = torch.cat([_loader(cfg, "validation").batch(k)["input_ids"].reshape(-1) for k in range(cfg.eval.batches)])
    own = unigram_entropy(torch.bincount(val, minlength=vocab))
    train, counts = _loader(cfg, "train"), torch.zeros(vocab, dtype=torch.float64)
    for k in range(train.num_samples()[0] // cfg.train.global_batch_size):
        counts += torch.bincount(train.batch(k)["input_ids"].reshape(-1), minlength=vocab).double()
    q = (counts + UNIGRAM_PRIOR) / (counts.sum() + UNIGRAM_PRIOR * vocab)
    return {
        "unigram_entropy": own["miller_madow"],
        "unigram_entropy_plug_in": own["plug_in"],
        "validation_types": own["types"],
        "unigram_cross_entropy": float(-q.log()[val].mean()),
        "validation_tokens": int(val.numel()),
        "unigram_training_tokens": int(counts.sum()),
    }


def bucket_means(records: list[dict], n_buckets: int, steps: tuple[int, int]) -> dict[str, float]:
    """Mean logged training loss of each t-bucket over the records with ``lo <= step <= hi``."""
    lo, hi = steps
    out = {}
    for i in range(n_buckets):
        vals = [r[f"loss_t{i}"] for r in records if lo <= r["step"] <= hi and isinstance(r.get(f"loss_t{i}"), (int, float))
                and math.isfinite(r[f"loss_t{i}"])]
        out[f"loss_t{i}"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def summarize(run_dir: Path, cfg, references: dict) -> dict:
    """The demo's numbers, read from the run's ``metrics.jsonl``."""
    from tools.plot import read_metrics, series

    records = read_metrics(run_dir / "metrics.jsonl")
    eval_steps, bounds = series(records, "eval_bound")
    if not eval_steps:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl holds no eval_bound (was eval.every 0?)")
    train = [r for r in records if "loss" in r]
    last_step = train[-1]["step"]
    # a logged step's bucket loss covers a few sequences: average a window of logged steps
    span = max(1, last_step // 6)
    n = cfg.logging.t_buckets
    first = (1, max(train[0]["step"], span // 3))  # the start: before the first fast drop is over
    last = (last_step - span + 1, last_step)
    return {
        "steps": last_step,
        "bound_start": {"step": eval_steps[0], "value": bounds[0]},
        "bound_end": {"step": eval_steps[-1], "value": bounds[-1]},
        **references,
        "t_buckets": n,
        "bucket_loss_first": {"steps": list(first), **bucket_means(train, n, first)},
        "bucket_loss_last": {"steps": list(last), **bucket_means(train, n, last)},
    }


def report(s: dict, plots: list[str], samples: str, timing: dict) -> str:
    n = s["t_buckets"]
    b0, b1 = s["bound_start"], s["bound_end"]
    f, last = s["bucket_loss_first"], s["bucket_loss_last"]
    gap = s["unigram_cross_entropy"] - b1["value"]
    below = s["unigram_entropy"] - b1["value"]
    lines = [
        "",
        "=" * 78,
        f"What the run learned ({s['steps']} steps; {timing['train_wall_s']:.0f} s of training, "
        f"{timing['train_cpu_s']:.0f} CPU-s):",
        f"  validation bound (nats/token, {s['validation_tokens']:,} held-out tokens, fixed noise):",
        f"    step {b0['step']:>5}: {b0['value']:.3f}",
        f"    step {b1['step']:>5}: {b1['value']:.3f}",
        f"  unigram entropy of the same validation tokens (Miller-Madow estimate: plug-in "
        f"{s['unigram_entropy_plug_in']:.3f} + (K-1)/2N with K = {s['validation_types']:,} types): "
        f"{s['unigram_entropy']:.3f}",
        f"    -> the bound is {abs(below):.2f} nats {'below' if below >= 0 else 'ABOVE'} it",
        f"  unigram model of the training split ({s['unigram_training_tokens']:,} tokens) scored on the same "
        f"validation tokens: {s['unigram_cross_entropy']:.3f}",
        f"    -> the bound is {abs(gap):.2f} nats {'below' if gap >= 0 else 'ABOVE'} it",
        f"  training loss by t-bucket (mean of the logged steps {f['steps'][0]}-{f['steps'][1]} -> "
        f"{last['steps'][0]}-{last['steps'][1]}):",
        f"    least masked, t in [0, {1 / n:.2f}): {f['loss_t0']:.3f} -> {last['loss_t0']:.3f}",
        f"    most masked,  t in [{(n - 1) / n:.2f}, 1): {f[f'loss_t{n - 1}']:.3f} -> {last[f'loss_t{n - 1}']:.3f}",
        "  plots:",
        *(f"    {p}" for p in plots),
        "  samples from the HF export (temperature 0.8):",
        *(f"    {line}" for line in samples.strip().splitlines()),
        "=" * 78,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--data", default=None, help="token shard folder (default RUN_DIR/data, prepared if missing)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override train.max_steps (the schedule's decay and the evaluations scale with it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override for python -m train (repeatable)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    data_dir = Path(args.data) if args.data else run_dir / "data"
    # a fresh run each time (the prepared shards are kept and reused)
    for stale in ("checkpoints", "hf", "plots", "metrics.jsonl", "events.jsonl", "wandb", "demo_summary.json"):
        path = run_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    run(["-m", "data.prepare", "--input", "embedded", "--output", str(data_dir)])
    overrides = [f"train.out_dir={run_dir}", f"data.sources=[{{path: {data_dir}}}]"]
    if args.steps is not None:
        from train.config import load_config

        base = load_config(CONFIG, check_paths=False)
        scale = args.steps / base.train.max_steps
        every = max(1, round(base.eval.every * scale))
        overrides += [
            f"train.max_steps={args.steps}",
            f"train.warmup_steps={max(1, round(base.train.warmup_steps * scale))}",
            f"train.decay_steps={round(base.train.decay_steps * scale)}",
            f"eval.every={every if args.steps % every == 0 else args.steps}",  # always one at the last step
            f"logging.log_every={max(1, round(base.logging.log_every * scale))}",
        ]
    overrides += args.set

    from train.config import load_config

    cfg = load_config(CONFIG, overrides)
    if cfg.eval.every <= 0 or cfg.train.max_steps % cfg.eval.every:
        raise SystemExit(f"error: the demo needs an evaluation at the last step (eval.every={cfg.eval.every}, "
                         f"train.max_steps={cfg.train.max_steps})")
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    run(["-m", "train", CONFIG, *overrides])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {
        "train_wall_s": time.perf_counter() - start,
        "train_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }

    references = unigram_references(cfg)
    summary = summarize(run_dir, cfg, references)
    plots = run([
        "-m", "tools.plot", str(run_dir),
        "--hline", f"unigram model (training split)={references['unigram_cross_entropy']:.4f}",
        "--hline", f"unigram entropy, Miller-Madow (validation tokens)={references['unigram_entropy']:.4f}",
    ], capture=True).split()

    hf_dir = run_dir / "hf"
    run(["-m", "tools.convert_to_hf", str(run_dir), str(hf_dir), "--force"])
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    samples = run([
        "-m", "tools.generate", "--checkpoint", str(hf_dir), *prompts,
        "--gen-length", "48", "--steps", "48", "--block-length", "16", "--temperature", "0.8",
    ], capture=True)
    summary.update(timing=timing, plots=plots, samples=samples)
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary, plots, samples, timing))
    print(f"\ndemo done: run folder {run_dir}, HF export {hf_dir}, numbers in {run_dir / 'demo_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
