"""torchrun worker for the guard suite (launched by tests/train/test_guards_multirank.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 guard_worker.py OUT.json SHARDS RUN_ROOT CASE [CASE ...]

Each case is a layout (``dp2_z1``, ``dp2_z2``, ``dp2_z3``, ``tp2``, ``pp2``, ``dp2_z1_bf16``) in which the real
``Trainer`` runs 10 optimizer steps with the faults of :func:`inject`: a NaN at data step 2, a
spike seen by rank 1 alone at data step 4 (the ranks must agree to skip it), and real loss spikes
at data steps 6 and 7 (K=2 in a row: roll back to the step-6 checkpoint and skip data steps
6..7). Rank 0 writes ``{case: [per-rank result]}`` to OUT.json: the history (step, data step,
loss, grad norm, counters), the events (rank 0) and a checksum of the final weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

DEMO = os.path.join(ROOT, "configs", "demo.yaml")
OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
    "model.mlp_hidden_size=128", "train.seq_len=32", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.max_steps=10", "train.warmup_steps=1", "train.decay_steps=0",
    "train.random_length_prob=0", "train.checkpoint_every=2", "train.keep_last=10",
    "logging.log_every=1", "logging.wandb=disabled", "logging.progress_bar=false", "eval.every=0",
    "guard.spike_warmup=3", "guard.t_buckets=4", "guard.rollback_after=2",
]
LAYOUTS = {
    "dp2_z1": ["parallel.zero_stage=1"],
    "dp2_z2": ["parallel.zero_stage=2"],
    "dp2_z3": ["parallel.zero_stage=3"],
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "dp2_z1_bf16": ["parallel.zero_stage=1", "train.precision=bf16"],  # DeepSpeed's BF16_Optimizer
}
NAN_AT, VETO_AT, SPIKES_AT = 2, 4, (6, 7)  # data steps (0-based)


def inject(trainer, *, vetoing_rank: bool) -> None:
    """The faults of the suite (see the module docstring), keyed by data step."""
    from train.guards import Verdict

    original = trainer.micro_batches

    def micro_batches(batch, step, **kw):
        mbs, times = original(batch, step, **kw)
        if step == NAN_AT:
            mbs = [dataclasses.replace(mb, row_weight=torch.full_like(mb.row_weight, float("nan"))) for mb in mbs]
        if step in SPIKES_AT:
            mbs = [dataclasses.replace(mb, row_weight=mb.row_weight * 30.0) for mb in mbs]
        return mbs, times

    judge = trainer.run_guard.guard.judge

    def rank_local_judge(loss, grad_norm, stats, judge_spikes):
        verdict = judge(loss, grad_norm, stats, judge_spikes)
        if vetoing_rank and trainer.run_guard.next_data_step(trainer.data_step) == VETO_AT:
            return Verdict("spike", math.nan, None)
        return verdict

    trainer.micro_batches = micro_batches
    trainer.run_guard.guard.judge = rank_local_judge


def summary(trainer, history: list[dict]) -> dict:
    keys = ("step", "data_step", "loss", "grad_norm", "skipped_nonfinite", "skipped_spike", "rollbacks")
    weights = trainer.engine.model_state_dict()
    # what a checkpoint save gathers (on rank 0 only) must be the same as the all-ranks gather
    gathered_ok = True
    if hasattr(trainer.engine, "pm"):
        import torch.distributed as dist

        for full, only0 in (
            (weights, trainer.engine.model_state_dict(only_rank0=True)),
            (trainer.engine.full_optimizer_state(), trainer.engine.full_optimizer_state(only_rank0=True)),
        ):
            if dist.get_rank() == 0:
                gathered_ok &= only0.keys() == full.keys() and all(torch.equal(only0[k], v) for k, v in full.items())
            else:
                gathered_ok &= only0 == {}
    return {
        "rank0_gather_ok": gathered_ok,
        "history": [{k: r[k] for k in keys} for r in history],
        "events": [{k: e.get(k) for k in ("event", "reason", "step", "data_step", "skip_window", "checkpoint")}
                   for e in trainer.events.read()],
        "weights": {k: float(v.double().sum()) for k, v in sorted(weights.items())},
    }


def main() -> int:
    out_path, shards, run_root, cases = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(CUDA_DEVICE_MAX_CONNECTIONS|Transformer Engine|Apex).*")
    import torch.distributed as dist

    from parity_worker import finish, run_cases
    from train.config import load_config
    from train.distributed import init_distributed
    from train.trainer import Trainer

    init_distributed(use_cuda=False)
    rank = dist.get_rank()

    def run(case: str) -> dict:
        overrides = OVERRIDES + LAYOUTS[case] + [
            f"train.out_dir={os.path.join(run_root, case)}", f"data.sources=[{{path: {shards}}}]",
        ]
        trainer = Trainer(load_config(DEMO, overrides))
        try:
            inject(trainer, vetoing_rank=rank == 1)
            history = trainer.fit()
            return summary(trainer, history)
        finally:
            trainer.engine.close()

    return finish(out_path, run_cases(cases, run))


if __name__ == "__main__":
    sys.exit(main())
