"""``python -m tools.plot RUN_DIR [--out DIR]``: training curves to PNG, for runs without wandb.

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step, written by the trainer on
rank 0) and writes three PNGs into ``--out`` (default ``RUN_DIR/plots``):

- ``loss.png``: the training loss (and ``eval_bound`` when the run evaluated);
- ``loss_by_t.png``: the loss per t-bucket (``loss_t0`` .. ``loss_t{n-1}``; bucket i covers
  t in [i/n, (i+1)/n));
- ``throughput.png``: tokens/s (and MFU on a second axis when it was logged).

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


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draw the PNGs for ``run_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series(records, "loss"), label="train loss")
    steps, bound = series(records, "eval_bound")
    if steps:
        ax.plot(steps, bound, "o-", label="eval bound")
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
        ax.plot(*series(records, key), label=f"t in [{lo:.2f}, {hi:.2f})", color=plt.cm.viridis(i / max(n - 1, 1)))
    ax.set(xlabel="step", ylabel="loss per token", title=f"{title}: loss by t-bucket")
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
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
