"""Resharding on CPU/gloo: full weights + full optimizer state move between layouts exactly.

Each case ``A-to-B`` trains 2 steps in layout A and saves a checkpoint (every rank writes its own
chunks, ``train.checkpoint``), builds layout B from other initial weights, loads the checkpoint
(every rank reads its own chunks) and takes step 3; that step's loss and grad norm (relative
1e-5) and the weights after it (absolute 1e-5) must equal layout A's uninterrupted third step, and
``tools.convert_to_hf`` of A's checkpoint must give the logits of A's model. The ``_nostate`` control loads zero moments and
must NOT match (the weight check sees the optimizer state). ``local`` is LocalEngine (TP1 PP1
DP1); ``tp{T}_pp{P}_z{Z}`` is ParallelEngine with dp = world / (T·P).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.train.test_parallel_engine import launch_worker

HERE = os.path.dirname(os.path.abspath(__file__))
REL_TOL, WEIGHT_TOL, STATE_TOL = 1e-5, 1e-5, 1e-4

TWO_RANKS = [
    "tp2_pp1_z0-to-local",  # TP2 -> TP1
    "local-to-tp2_pp1_z0",  # TP1 -> TP2
    "tp1_pp2_z0-to-local",  # PP2 -> PP1
    "tp1_pp1_z2-to-local",  # DP2 ZeRO-2 -> DP1
    "local-to-tp1_pp1_z2",  # DP1 -> DP2 ZeRO-2
    "tp2_pp1_z0-to-tp1_pp2_z1",  # TP2 -> PP2 ZeRO-1
    "tp1_pp1_z3-to-tp2_pp1_z1",  # DP2 ZeRO-3 -> TP2 ZeRO-1
    "local-to-tp1_pp1_z3",  # into fresh ZeRO-3 partitions
]
FOUR_RANKS = [
    "tp2_pp1_z2-to-tp1_pp2_z1",  # TP2×DP2 ZeRO-2 -> PP2×DP2 ZeRO-1
    "tp2_pp2_z0-to-local",  # TP2×PP2 -> one device
]
CONTROL = "tp2_pp1_z0-to-local_nostate"


def launch(nproc: int, cases: list[str], tmp_path) -> dict:
    return launch_worker("reshard_worker.py", nproc, cases, tmp_path)


def check(result: dict, case: str) -> None:
    assert "error" not in result, f"{case}: {result['error']}"
    assert result["step_count"] == 2, f"{case}: optimizer step count {result['step_count']} != 2"
    assert result["state"] <= STATE_TOL, f"{case}: full optimizer state differs from LocalEngine's by {result['state']:.3g}"
    for key in ("loss", "norm"):
        assert result[key] <= REL_TOL, f"{case}: relative {key} difference {result[key]:.3g} > {REL_TOL}"
    assert result["weights"] <= WEIGHT_TOL, f"{case}: weights differ by {result['weights']:.3g}"
    # tools.convert_to_hf of layout A's multi-rank checkpoint computes the training model's logits
    assert result["hf_logits"] <= 1e-6, f"{case}: HF export logits differ by {result['hf_logits']:.3g}"


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return launch(2, TWO_RANKS + [CONTROL], tmp_path_factory.mktemp("reshard2"))


@pytest.mark.parametrize("case", TWO_RANKS)
def test_two_rank_reshard_resumes_exactly(two_rank_results, case):
    check(two_rank_results[case], case)


def test_zero_moments_would_be_caught(two_rank_results):
    """Control: the same resume with the moments zeroed moves the weights far beyond the bound."""
    result = two_rank_results[CONTROL]
    assert "error" not in result, result.get("error")
    assert result["loss"] <= REL_TOL  # the step's loss depends on the weights only
    assert result["weights"] > 100 * WEIGHT_TOL


def test_four_rank_reshard_resumes_exactly(tmp_path):
    results = launch(4, FOUR_RANKS, tmp_path)
    for case in FOUR_RANKS:
        check(results[case], case)


def _local_engine(seed: int):
    sys.path.insert(0, HERE)
    from model.llada import build_model
    from parity_worker import OPT, tiny_config
    from train.local_engine import LocalEngine

    return LocalEngine(build_model(tiny_config(2), seed), lr=1e-2, precision="fp32", device=torch.device("cpu"), **OPT)


def test_local_engine_round_trip_and_errors():
    """In process: a fresh engine is all-zero at step 0; state written by one engine loads into
    another bit for bit; a missing key or a wrong shape is one clear ValueError."""
    from train.engine import MicroBatch

    a, b = _local_engine(1), _local_engine(2)
    fresh = a.full_optimizer_state()
    assert int(fresh["::step"]) == 0 and all(float(v.abs().max()) == 0 for v in fresh.values())
    ids = torch.randint(0, 120, (2, 8), generator=torch.Generator().manual_seed(0))
    masked = torch.ones(2, 8, dtype=torch.bool)
    mb = MicroBatch(ids, ids, masked, torch.ones(2), torch.full((2,), 1 / 16))
    a.train_step([mb], 1e-2)
    state = a.full_optimizer_state()
    assert int(state["::step"]) == 1 and float(state["transformer.wte.weight::exp_avg_sq"].abs().max()) > 0
    b.load_full_optimizer_state(state)
    again = b.full_optimizer_state()
    assert set(again) == set(state) and all(torch.equal(again[k], v) for k, v in state.items())
    name = next(k for k in state if k.endswith("::exp_avg"))
    with pytest.raises(ValueError, match="missing key"):
        b.load_full_optimizer_state({k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="has shape"):
        b.load_full_optimizer_state({**state, name: torch.zeros(3)})
