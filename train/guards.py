"""Numeric guards: a step whose loss or grad norm is not finite, or whose loss is a spike for its
t-mix, is vetoed before the optimizer update; K vetoed steps in a row ask for a rollback.

The engine asks a :class:`StepGate` (one per step, made by :meth:`StepGuard.gate`) at the point
where the gradients are reduced and the grad norm is known but no weight has changed yet:

1. ``gate.row_stats(per_row, row_weight)``: this rank's per-t-bucket ``[3, B]`` sums (row count,
   Σx, Σx²) of the row losses ``x = Σ_masked CE/p_mask · row_weight``; the engine sums them over
   the data-parallel ranks (the rows of a DP rank are the same on its TP/PP peers);
2. ``gate.decide(loss, grad_norm, stats)`` on every rank with the same global values returns a
   reason to skip (``"nonfinite"``, ``"spike"``) or ``None``; the engine all-reduces the verdict
   (MAX over all ranks), so one rank's veto is every rank's.

Spikes are judged per t-bucket because the 1/t weight makes low-t rows noisy by nature: the
guard keeps, per bucket b, a bias-corrected EMA of the row-loss mean μ_b and of the row-loss
variance v_b (deviations from μ_b, so it also sees drift). A step's expected loss given its t-mix
is Σ_b n_b·μ_b with variance Σ_b n_b·v_b over the buckets that have seen ``spike_warmup`` good
steps; its z-score is (Σ_b Σx − expected) / sqrt(variance), and z > ``spike_z`` vetoes the step.
Only applied full-length steps update the statistics (random-length steps have other variances
and are not judged). The statistics are part of the trainer state in every checkpoint.

:class:`RunGuard` holds the run-level state around the gate: the counters of vetoed steps, the
bad streak, the skip windows (data steps never trained on again) and the rollback decision
(when, and to which checkpoint). The trainer asks it; ``train.checkpoint`` stores it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from model.objective import bucket_row_stats, t_bucket_index  # the one t-bucket helper


class GuardError(RuntimeError):
    """The run cannot go on: K bad steps in a row with nothing to roll back to, or too many rollbacks."""


REASONS = ("nonfinite", "spike")  # veto reasons, in increasing precedence when ranks disagree


def reason_code(reason: str | None) -> int:
    """0 for no veto, else a positive code (all-reduced with MAX to agree across ranks)."""
    if reason is None:
        return 0
    return REASONS.index(reason) + 1 if reason in REASONS else len(REASONS) + 1


def reason_name(code: int) -> str | None:
    if code == 0:
        return None
    return REASONS[code - 1] if code <= len(REASONS) else "vetoed"


@dataclass
class GuardConfig:
    """The ``guard:`` section of a run config."""

    nonfinite: bool = True  # skip the optimizer step when the loss or grad norm is NaN/inf
    spike_z: float = 6.0  # skip a step whose loss z-score for its t-mix exceeds this (<= 0: off)
    spike_warmup: int = 50  # good steps a t-bucket needs before it is judged
    spike_ema: float = 0.98  # decay of the running per-bucket mean and variance
    t_buckets: int = 10  # equal-width buckets of t for the spike statistics
    rollback_after: int = 3  # K: after K skipped steps in a row roll back to the last checkpoint (0: never)
    max_rollbacks: int = 5  # stop with an error after this many rollbacks in one process

    def __post_init__(self) -> None:
        if self.t_buckets <= 0:
            raise ValueError(f"bad value for 'guard.t_buckets': {self.t_buckets} (must be positive)")
        if not 0 <= self.spike_ema < 1:
            raise ValueError(f"bad value for 'guard.spike_ema': {self.spike_ema} (must be in [0, 1))")
        for key in ("spike_warmup", "rollback_after", "max_rollbacks"):
            if getattr(self, key) < 0:
                raise ValueError(f"bad value for 'guard.{key}': {getattr(self, key)} (must be >= 0)")


def spike_z(stats: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, judged: torch.Tensor) -> float:
    """z-score of a step's summed row loss against the running per-bucket statistics, over the
    buckets in ``judged`` that hold rows (NaN when there are none)."""
    use = judged & (stats[0] > 0)
    if not bool(use.any()):
        return float("nan")
    n, total = stats[0][use], stats[1][use]
    expected = float((n * mean[use]).sum())
    variance = float((n * var[use]).sum())
    variance = max(variance, (1e-6 * abs(expected)) ** 2, 1e-300)
    return (float(total.sum()) - expected) / math.sqrt(variance)


@dataclass
class Verdict:
    reason: str | None  # None: apply the step; "nonfinite" or "spike": skip it
    z: float  # the spike z-score (NaN when not judged)
    worst_bucket: int | None  # the bucket with the largest excess over its running mean


class StepGate:
    """One step's veto point (see the module docstring); made by :meth:`StepGuard.gate`."""

    def __init__(self, guard: "StepGuard", bucket: torch.Tensor, judge_spikes: bool) -> None:
        self.guard = guard
        self.bucket = bucket
        self.judge_spikes = judge_spikes
        self.stats: torch.Tensor | None = None
        self.verdict: Verdict | None = None

    def row_stats(self, per_row: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
        """This rank's ``[3, B]`` bucket sums of ``per_row · row_weight`` (rows in this rank's order)."""
        if per_row.numel() != self.bucket.numel():
            raise ValueError(f"guard: {per_row.numel()} row losses for {self.bucket.numel()} rows")
        return bucket_row_stats(self.bucket, per_row.double().cpu() * row_weight.double().cpu(), self.guard.cfg.t_buckets)

    def decide(self, loss: float, grad_norm: float, stats: torch.Tensor) -> str | None:
        """Given the global loss, grad norm and bucket sums (identical on every rank), the reason
        to skip this step or None. Pure: the guard's statistics change only in :meth:`StepGuard.observe`."""
        self.stats = stats.detach().double().cpu()
        self.verdict = self.guard.judge(loss, grad_norm, self.stats, self.judge_spikes)
        return self.verdict.reason


class StepGuard:
    """Running per-t-bucket loss statistics and the counters of guard events (state in checkpoints)."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        b = cfg.t_buckets
        self.raw_mean = torch.zeros(b, dtype=torch.float64)  # EMA accumulators (bias-corrected on read)
        self.raw_var = torch.zeros(b, dtype=torch.float64)
        self.seen = torch.zeros(b, dtype=torch.int64)  # good full-length steps with rows in the bucket

    # ----- per step ---------------------------------------------------------------------------
    def gate(self, times: torch.Tensor, *, judge_spikes: bool = True) -> StepGate:
        """The gate of one step whose rows (on this rank, in order) have diffusion times ``times``."""
        return StepGate(self, t_bucket_index(times, self.cfg.t_buckets), judge_spikes)

    def _corrected(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = 1.0 - torch.pow(torch.tensor(self.cfg.spike_ema, dtype=torch.float64), self.seen.double())
        weight = torch.where(self.seen > 0, weight, torch.ones_like(weight))
        return self.raw_mean / weight, self.raw_var / weight

    def judge(self, loss: float, grad_norm: float, stats: torch.Tensor, judge_spikes: bool) -> Verdict:
        if self.cfg.nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict("nonfinite", float("nan"), None)
        if self.cfg.spike_z <= 0 or not judge_spikes or not bool(torch.isfinite(stats).all()):
            return Verdict(None, float("nan"), None)
        mean, var = self._corrected()
        judged = self.seen >= max(self.cfg.spike_warmup, 1)
        z = spike_z(stats, mean, var, judged)
        worst = None
        use = judged & (stats[0] > 0)
        if bool(use.any()):
            excess = torch.where(use, (stats[1] - stats[0] * mean) / (stats[0] * var).clamp_min(1e-300).sqrt(), -math.inf)
            worst = int(excess.argmax())
        return Verdict("spike" if z > self.cfg.spike_z else None, z, worst)

    def observe(self, stats: torch.Tensor) -> None:
        """Fold the bucket sums of an applied, full-length step into the running statistics."""
        beta = self.cfg.spike_ema
        n, s, q = stats[0], stats[1], stats[2]
        has = n > 0
        if not bool(has.any()) or not bool(torch.isfinite(stats).all()):
            return
        mean, _ = self._corrected()
        centre = torch.where(self.seen > 0, mean, s / n.clamp_min(1))  # first time: the step's own mean
        dev2 = (q - 2 * centre * s + n * centre * centre) / n.clamp_min(1)  # mean squared deviation
        step_mean = s / n.clamp_min(1)
        self.raw_mean = torch.where(has, beta * self.raw_mean + (1 - beta) * step_mean, self.raw_mean)
        self.raw_var = torch.where(has, beta * self.raw_var + (1 - beta) * dev2.clamp_min(0), self.raw_var)
        self.seen = self.seen + has.long()

    # ----- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serializable (floats round-trip exactly through ``repr``)."""
        return {
            "t_buckets": self.cfg.t_buckets,
            "raw_mean": self.raw_mean.tolist(),
            "raw_var": self.raw_var.tolist(),
            "seen": self.seen.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("t_buckets", -1)) != self.cfg.t_buckets:
            return  # other bucketing: start the statistics afresh (warmup again)
        self.raw_mean = torch.tensor(state["raw_mean"], dtype=torch.float64)
        self.raw_var = torch.tensor(state["raw_var"], dtype=torch.float64)
        self.seen = torch.tensor(state["seen"], dtype=torch.int64)


@dataclass
class Rollback:
    """A rollback the guard decided on: go back to ``target`` (a checkpoint, as the caller named
    it) and never train on data steps ``window[0]`` .. ``window[1] - 1`` again."""

    target: Any
    window: list[int]
    where: str  # the bad streak in words, for the log


class RunGuard:
    """The guard's run-level state: the step guard's statistics, counters of vetoed steps, the bad
    streak, the skip windows and the rollback decision. ``state_dict`` is stored in checkpoints
    (with the rollback count); ``rollbacks_here`` counts this process's rollbacks only."""

    COUNTS = ("nonfinite", "spike", "rollbacks")

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.guard = StepGuard(cfg)
        self.counts = dict.fromkeys(self.COUNTS, 0)  # kept in checkpoints
        self.skip_windows: list[list[int]] = []  # [start, end) data steps never trained on (rollbacks)
        self.bad_streak = 0  # vetoed steps in a row
        self.bad_streak_start: int | None = None  # data step of the first of them
        self.rollbacks_here = 0  # rollbacks in this process (guard.max_rollbacks)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps vetoed (non-finite or spike), over the whole run."""
        return self.counts["nonfinite"] + self.counts["spike"]

    # ----- per step ---------------------------------------------------------------------------
    def next_data_step(self, data_step: int) -> int:
        """The first data step at or after ``data_step`` outside every skip window."""
        moved = True
        while moved:
            moved = False
            for start, end in self.skip_windows:
                if start <= data_step < end:
                    data_step, moved = end, True
        return data_step

    def gate(self, times: torch.Tensor, *, judge_spikes: bool) -> StepGate:
        return self.guard.gate(times, judge_spikes=judge_spikes)

    def record(self, gate: StepGate, skip_reason: str | None, data_step: int) -> None:
        """After a step trained on ``data_step``: a vetoed one (``skip_reason``) is counted and
        starts or extends the bad streak; an applied one ends the streak and, full-length, feeds
        the spike statistics."""
        if skip_reason is not None:
            self.counts["spike" if skip_reason == "spike" else "nonfinite"] += 1
            if self.bad_streak == 0:
                self.bad_streak_start = data_step
            self.bad_streak += 1
            return
        self.bad_streak, self.bad_streak_start = 0, None
        if gate.stats is not None and gate.judge_spikes:  # full-length steps only
            self.guard.observe(gate.stats)

    # ----- rollbacks --------------------------------------------------------------------------
    def rollback_due(self) -> bool:
        k = self.cfg.rollback_after
        return k > 0 and self.bad_streak >= k

    def plan_rollback(self, next_data_step: int, checkpoints: Iterable[tuple[Any, int]], where_saved: str) -> Rollback:
        """The rollback for the current bad streak (``next_data_step``: the loader's next batch):
        the newest of ``checkpoints`` (``(checkpoint, data step it was saved at)``, newest first,
        undamaged ones only) saved before the streak's first data step. :class:`GuardError` when
        there is none (``where_saved`` names where they were looked for) or the run has rolled
        back ``guard.max_rollbacks`` times already."""
        window = [int(self.bad_streak_start), int(next_data_step)]
        where = f"{self.bad_streak} skipped steps in a row (data steps {window[0]}..{window[1] - 1})"
        target = next((ckpt for ckpt, saved_at in checkpoints if saved_at <= window[0]), None)
        if target is None:
            raise GuardError(
                f"guard: {where} and no checkpoint from before them in {where_saved} to roll back "
                "to; stopping (see events.jsonl). Lower the learning rate, check the data, or set "
                "train.checkpoint_every so that there is one"
            )
        if self.rollbacks_here >= self.cfg.max_rollbacks:
            raise GuardError(
                f"guard: {where} after {self.rollbacks_here} rollbacks already (guard.max_rollbacks={self.cfg.max_rollbacks}); "
                "stopping: the run keeps diverging (see events.jsonl)"
            )
        return Rollback(target, window, where)

    def rolled_back(self, plan: Rollback, before: dict) -> None:
        """After the checkpoint of ``plan`` was restored (which loaded its older state): keep the
        counters from ``before`` (:meth:`state_dict` taken before the restore), count the
        rollback and add the streak's window to the skip windows."""
        self.counts = {k: int(before["guard_counts"][k]) for k in self.COUNTS}
        self.counts["rollbacks"] += 1
        self.rollbacks_here += 1
        self.skip_windows = sorted([list(map(int, w)) for w in before["skip_windows"]] + [plan.window])

    # ----- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer-state fields of a checkpoint (JSON-serializable)."""
        return {
            "skip_windows": [list(w) for w in self.skip_windows], "skipped_steps": self.skipped_steps,
            "guard_counts": dict(self.counts), "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint's trainer state, also one written before a field existed (no skip
        windows, no guard statistics, only ``skipped_steps``). Ends any bad streak."""
        self.skip_windows = [list(map(int, w)) for w in state.get("skip_windows", [])]
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        counts = state.get("guard_counts", {"nonfinite": int(state.get("skipped_steps", 0))})
        self.counts = {k: int(counts.get(k, 0)) for k in self.COUNTS}
        self.bad_streak, self.bad_streak_start = 0, None
