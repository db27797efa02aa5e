"""Training metrics on the logging rank: a console line, ``metrics.jsonl`` and wandb.

wandb runs offline by default (files under ``<out_dir>/wandb``, sync later with ``wandb sync``);
``logging.wandb=online`` streams to the server when the user has a key; ``disabled`` turns it off.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm


def format_line(step: int, values: dict) -> str:
    keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "eval_bound")
    parts = [f"step {step}"]
    for k in keys:
        if k in values and values[k] is not None:
            v = values[k]
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


def _not_measured(key: str) -> bool:
    """Keys whose NaN means "not measured this step" (no spike verdict, an empty t-bucket)."""
    return key == "spike_z" or (key.startswith("loss_t") and key[6:].isdigit())


def json_safe(values: dict) -> dict:
    """``values`` as strict JSON: every non-finite float becomes ``null`` (never dropped); the keys
    whose value was NaN or infinite (a diverged loss, an overflowing grad norm) are listed under
    ``"nonfinite"``, except keys whose NaN only means "not measured this step"."""
    out, flagged = {}, []
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
            if not _not_measured(k):
                flagged.append(k)
        else:
            out[k] = v
    if flagged:
        out["nonfinite"] = flagged
    return out


class MetricsLogger:
    """Writes one JSON object per logged step to ``<out_dir>/metrics.jsonl`` (appending, so a
    resumed run continues the same file), prints a console line, and mirrors to wandb."""

    def __init__(self, out_dir: str, *, enabled: bool, wandb_mode: str, project: str, run_name: str | None, config: dict) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            import wandb  # imported lazily: it is slow to import

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=project,
                name=run_name,
                mode=wandb_mode,
                dir=str(Path(out_dir)),
                config=config,
                resume="allow",
            )

    def log(self, step: int, values: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **json_safe(values)}
        clean = {k: v for k, v in record.items() if k not in ("step", "nonfinite") and v is not None}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if console:  # a non-finite loss shows as "nan"/"inf" here
            tqdm.write(format_line(step, values))
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class EventLog:
    """Guard and fault events (skipped steps, rollbacks, damaged checkpoints, preemption): one
    JSON object per event in ``<out_dir>/events.jsonl`` (appending across relaunches) and a
    console line, on the logging rank."""

    def __init__(self, out_dir: str, *, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "events.jsonl"

    def write(self, event: str, *, console: str | None = None, **fields) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **clean}) + "\n")
        if console:
            tqdm.write(console)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
