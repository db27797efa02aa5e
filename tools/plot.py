"""``python -m tools.plot RUN_DIR [--out DIR]``: training curves to PNG, for runs without wandb.

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step, written by the trainer on
rank 0) and writes three PNGs into ``--out`` (default ``RUN_DIR/plots``):

- ``loss.png``: the training loss (and ``eval_bound`` when the run evaluated), with optional
  horizontal references (``--hline "unigram entropy=6.6"``);
- ``loss_by_t.png``: the loss per t-bucket (``loss_t0`` .. ``loss_t{n-1}``; bucket i covers
  t in [i/n, (i+1)/n));
- ``throughput.png``: tokens/s (and MFU on a second axis when it was logged).

A logged step's loss (and much more its loss per t-bucket, a few sequences each at a small batch)
is noisy: the raw points are drawn faint, under a moving average over ``--smooth`` logged records
(default: about a tenth of them, at least 3).

A resumed run appends to the same file; when a step appears twice the later record wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

BUCKET_KEY = re.compile(r"^loss_t(\d+)$")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` sorted by step, one per step (the last one written wins)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{lineno}: not a JSON object") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path}:{lineno}: a record needs a 'step' key")
            by_step[int(record["step"])] = record
    if not by_step:
        raise ValueError(f"{path}: no records")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that hold a finite number under ``key``."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (shrinking at the ends); same length."""
    if window <= 1 or not values:
        return list(values)
    half_lo, half_hi = (window - 1) // 2, window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half_lo), min(len(values), i + half_hi + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def default_window(n_points: int) -> int:
    return max(3, n_points // 10)


def _plot_smoothed(ax, steps, values, window, color, label):
    """Faint raw points under their moving average (one legend entry)."""
    if not steps:
        return
    ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
    ax.plot(steps, smooth(values, window), color=color, linewidth=1.8, label=label)


def bucket_keys(records: list[dict]) -> list[str]:
    found = {int(m.group(1)) for r in records for k in r if (m := BUCKET_KEY.match(k))}
    return [f"loss_t{i}" for i in sorted(found)]


def _save(fig, path: Path) -> None:
    """Atomic PNG write: temp file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
    smooth_window: int | None = None, references: dict[str, float] | None = None,
) -> list[Path]:
    """Draw the PNGs for ``run_dir``; returns their paths. ``smooth_window``: logged records per
    moving average (None: :func:`default_window`); ``references``: label -> a horizontal line on
    the loss plot (e.g. a unigram entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    written = []

    def window(n_points: int) -> int:
        return smooth_window if smooth_window is not None else default_window(n_points)

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, loss = series(records, "loss")
    _plot_smoothed(ax, steps, loss, window(len(steps)), "tab:blue", "train loss")
    steps, bound = series(records, "eval_bound")
    if steps:
        ax.plot(steps, bound, "o-", color="tab:red", label="eval bound")
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="0.3", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=f"{label} {value:.2f}")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(out / "loss.png")
    _save(fig, written[-1])
    plt.close(fig)

    keys = bucket_keys(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(keys)
    for i, key in enumerate(keys):
        lo, hi = (int(key[6:]) / n, (int(key[6:]) + 1) / n)
        steps, values = series(records, key)
        _plot_smoothed(ax, steps, values, window(len(steps)), plt.cm.viridis(i / max(n - 1, 1)), f"t in [{lo:.2f}, {hi:.2f})")
    ax.set(xlabel="step", ylabel="loss per token", title=f"{title}: loss by t-bucket (moving average; raw faint)")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no loss_t* keys in metrics.jsonl", ha="center", transform=ax.transAxes)
    written.append(out / "loss_by_t.png")
    _save(fig, written[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series(records, "tokens_per_s"), color="tab:blue", label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s (all GPUs)", title=f"{title}: throughput")
    ax.grid(alpha=0.3)
    steps, mfu = series(records, "mfu")
    if steps:
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * m for m in mfu], color="tab:orange", label="MFU")
        ax2.set_ylabel("MFU (%)")
        fig.legend(loc="lower right")
    written.append(out / "throughput.png")
    _save(fig, written[-1])
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.plot", description="Plot a run's metrics.jsonl to PNG.")
    ap.add_argument("run_dir", help="a run folder holding metrics.jsonl (train.out_dir)")
    ap.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    ap.add_argument("--smooth", type=int, default=None, metavar="N",
                    help="moving average over N logged records (default: a tenth of them, at least 3; 1: none)")
    ap.add_argument("--hline", action="append", default=[], metavar="LABEL=VALUE",
                    help="a horizontal reference on the loss plot, e.g. 'unigram entropy=6.6' (repeatable)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    references = {}
    for item in args.hline:
        label, _, value = item.rpartition("=")
        try:
            references[label.strip() or "reference"] = float(value)
        except ValueError:
            ap.error(f"--hline {item!r}: expected LABEL=NUMBER")
    if args.smooth is not None and args.smooth < 1:
        ap.error("--smooth must be >= 1")
    try:
        paths = plot_run(args.run_dir, args.out, smooth_window=args.smooth, references=references)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
