"""The step guard's statistics and verdicts (train/guards.py), without a model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train.config import ConfigError, load_config
from train.guards import GuardConfig, GuardError, RunGuard, StepGuard, bucket_row_stats, t_bucket_index

B = 4
# per-bucket row-loss mean and std: low t (bucket 0) is noisy, high t is not
MEANS = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
STDS = torch.tensor([2.0, 0.5, 0.2, 0.1], dtype=torch.float64)


def _rows(gen: torch.Generator, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    b = t_bucket_index(t, B)
    return (MEANS[b] + STDS[b] * torch.randn(t.shape, generator=gen, dtype=torch.float64)) * scale


def _stratified(gen: torch.Generator, n: int = 32) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=gen, dtype=torch.float64)) / n


def _step(guard: StepGuard, t: torch.Tensor, x: torch.Tensor, *, loss: float = 1.0, norm: float = 1.0, judge=True):
    gate = guard.gate(t, judge_spikes=judge)
    reason = gate.decide(loss, norm, gate.row_stats(x, torch.ones_like(x)))
    if reason is None and judge:
        guard.observe(gate.stats)
    return reason, gate.verdict


def _warm(guard: StepGuard, gen: torch.Generator, steps: int = 60) -> None:
    for _ in range(steps):
        t = _stratified(gen)
        assert _step(guard, t, _rows(gen, t))[0] is None


def test_bucket_row_stats_counts_sums_and_squares():
    t = torch.tensor([0.05, 0.1, 0.6, 0.99, 1.0])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    stats = bucket_row_stats(t_bucket_index(t, B), x, B)
    assert stats.tolist() == [[2, 0, 1, 2], [3, 0, 3, 9], [5, 0, 9, 41]]


def test_normal_steps_pass_and_a_spike_is_vetoed():
    gen = torch.Generator().manual_seed(0)
    guard = StepGuard(GuardConfig(t_buckets=B, spike_warmup=20, spike_z=6.0, spike_ema=0.95))
    _warm(guard, gen)
    zs = []
    for _ in range(300):
        t = _stratified(gen)
        reason, verdict = _step(guard, t, _rows(gen, t))
        assert reason is None, verdict
        zs.append(verdict.z)
    assert max(abs(z) for z in zs) < 6 and 0.5 < torch.tensor(zs).std() < 2  # roughly standard normal
    t = _stratified(gen)
    reason, verdict = _step(guard, t, _rows(gen, t, scale=1.5))
    assert reason == "spike" and verdict.z > 6


def test_spikes_are_judged_per_t_bucket():
    gen = torch.Generator().manual_seed(1)
    guard = StepGuard(GuardConfig(t_buckets=B, spike_warmup=20, spike_ema=0.95))
    _warm(guard, gen)
    # a batch of only high-t rows has a high loss (5 vs an average of 3.5) but is normal for its t-mix
    t = torch.full((32,), 0.9, dtype=torch.float64)
    assert _step(guard, t, _rows(gen, t))[0] is None
    # +1.5 per row is within the noise of the low-t bucket (std 2) ...
    t = torch.full((8,), 0.1, dtype=torch.float64)
    assert _step(guard, t, MEANS[0] + 1.5 + torch.zeros(8, dtype=torch.float64))[0] is None
    # ... and a spike in a quiet high-t bucket (std 0.1), which the verdict names
    t = torch.full((8,), 0.9, dtype=torch.float64)
    reason, verdict = _step(guard, t, MEANS[3] + 1.5 + torch.zeros(8, dtype=torch.float64))
    assert reason == "spike" and verdict.worst_bucket == 3


def test_non_finite_loss_or_norm_and_the_switches():
    gen = torch.Generator().manual_seed(2)
    guard = StepGuard(GuardConfig(t_buckets=B, spike_warmup=5))
    t = _stratified(gen)
    assert _step(guard, t, _rows(gen, t), loss=math.nan)[0] == "nonfinite"
    assert _step(guard, t, _rows(gen, t), norm=math.inf)[0] == "nonfinite"
    off = StepGuard(GuardConfig(t_buckets=B, nonfinite=False, spike_z=0))
    assert _step(off, t, _rows(gen, t), loss=math.nan)[0] is None
    # before the warmup nothing is a spike; a random-length step (judge=False) never is
    fresh = StepGuard(GuardConfig(t_buckets=B, spike_warmup=5))
    _warm(fresh, gen, steps=4)
    assert _step(fresh, t, _rows(gen, t, scale=100.0))[0] is None
    _warm(fresh, gen, steps=10)
    assert _step(fresh, t, _rows(gen, t, scale=100.0), judge=False)[0] is None
    assert _step(fresh, t, _rows(gen, t, scale=100.0))[0] == "spike"


def test_vetoed_steps_do_not_move_the_statistics_and_state_round_trips_through_json():
    gen = torch.Generator().manual_seed(3)
    guard = StepGuard(GuardConfig(t_buckets=B, spike_warmup=10))
    _warm(guard, gen, steps=20)
    before = json.dumps(guard.state_dict())
    t = _stratified(gen)
    assert _step(guard, t, _rows(gen, t, scale=10.0))[0] == "spike"
    assert json.dumps(guard.state_dict()) == before
    copy = StepGuard(GuardConfig(t_buckets=B, spike_warmup=10))
    copy.load_state_dict(json.loads(before))
    x = _rows(gen, t)
    assert _step(copy, t, x)[1].z == _step(guard, t, x)[1].z
    assert torch.equal(copy.raw_mean, guard.raw_mean) and torch.equal(copy.raw_var, guard.raw_var)


@pytest.mark.parametrize(
    "override, message",
    [
        ("guard.t_buckets=0", "guard.t_buckets"),
        ("guard.spike_ema=1.0", "guard.spike_ema"),
        ("guard.rollback_after=-1", "guard.rollback_after"),
        ("guard.bogus=1", "unknown config key 'guard.bogus'"),
    ],
)
def test_bad_guard_config_is_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override], check_paths=False)


# ----- the run-level state (train.guards.RunGuard), without a trainer ------------------------------
def _gate(run: RunGuard, judge: bool = True):
    gate = run.gate(torch.tensor([0.1, 0.9], dtype=torch.float64), judge_spikes=judge)
    gate.decide(1.0, 1.0, gate.row_stats(torch.tensor([2.0, 5.0]), torch.ones(2)))
    return gate


def test_run_guard_skips_every_data_step_inside_the_skip_windows():
    run = RunGuard(GuardConfig())
    run.skip_windows = [[3, 5], [5, 7], [10, 11]]
    assert [run.next_data_step(d) for d in (0, 2, 3, 4, 5, 6, 7, 10, 11)] == [0, 2, 7, 7, 7, 7, 7, 11, 11]


def test_run_guard_counts_vetoed_steps_and_tracks_the_bad_streak():
    run = RunGuard(GuardConfig(rollback_after=2))
    run.record(_gate(run), None, 0)  # applied full-length: the statistics learn from it
    assert int(run.guard.seen.sum()) == 2 and run.bad_streak == 0
    run.record(_gate(run), "spike", 1)
    run.record(_gate(run), "nonfinite", 2)
    assert run.counts == {"nonfinite": 1, "spike": 1, "rollbacks": 0} and run.skipped_steps == 2
    assert (run.bad_streak, run.bad_streak_start) == (2, 1) and run.rollback_due()
    run.record(_gate(run, judge=False), None, 3)  # applied, random length: ends the streak, not learnt from
    assert (run.bad_streak, run.bad_streak_start) == (0, None) and not run.rollback_due()
    assert int(run.guard.seen.sum()) == 2
    never = RunGuard(GuardConfig(rollback_after=0))
    for d in range(5):
        never.record(_gate(never), "spike", d)
    assert not never.rollback_due()


def test_run_guard_rolls_back_to_the_newest_checkpoint_before_the_streak():
    run = RunGuard(GuardConfig(rollback_after=2, max_rollbacks=1))
    for d in (6, 7):
        run.record(_gate(run), "spike", d)
    saved = [("step_8", 8), ("step_6", 6), ("step_4", 4)]  # newest first
    plan = run.plan_rollback(8, iter(saved), "runs/x/checkpoints")
    assert plan.target == "step_6" and plan.window == [6, 8] and "data steps 6..7" in plan.where
    before = run.state_dict()
    run.load_state_dict({"skip_windows": [], "guard_counts": {"spike": 0}})  # what the restore loads
    run.rolled_back(plan, before)
    assert run.skip_windows == [[6, 8]] and run.counts == {"nonfinite": 0, "spike": 2, "rollbacks": 1}
    assert run.bad_streak == 0 and run.next_data_step(6) == 8
    for d in (8, 9):
        run.record(_gate(run), "spike", d)
    with pytest.raises(GuardError, match="after 1 rollbacks already"):
        run.plan_rollback(10, iter(saved), "runs/x/checkpoints")
    with pytest.raises(GuardError, match="no checkpoint from before them in runs/x/checkpoints"):
        run.plan_rollback(10, iter([("step_10", 10)]), "runs/x/checkpoints")


def test_run_guard_state_round_trips_and_reads_older_checkpoints():
    run = RunGuard(GuardConfig())
    run.skip_windows = [[2, 4]]
    run.record(_gate(run), None, 0)
    run.record(_gate(run), "nonfinite", 1)
    state = json.loads(json.dumps(run.state_dict()))
    again = RunGuard(GuardConfig())
    again.load_state_dict(state)
    assert again.state_dict() == run.state_dict() and again.bad_streak == 0
    old = RunGuard(GuardConfig())
    old.load_state_dict({"step": 5, "skipped_steps": 3})  # before guard_counts and skip windows existed
    assert old.counts == {"nonfinite": 3, "spike": 0, "rollbacks": 0} and old.skip_windows == []
