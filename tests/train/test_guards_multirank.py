"""The step guard under torchrun (2 ranks, gloo): in every layout -- DP2 with ZeRO-1/2/3, TP2, PP2,
and DP2 ZeRO-1 in bf16 -- a NaN step, a spike that only one rank sees and two spikes in a row (rollback) give the same
decisions on every rank and the same run as the single-process trainer."""

from __future__ import annotations

import math

import pytest

from tests.train import guard_worker as gw
from tests.train.test_parallel_engine import launch_worker
from train.config import load_config
from train.trainer import Trainer

CASES = list(gw.LAYOUTS)
REL = 1e-4  # fp32 sums split over ranks round differently; 10 steps at lr 3e-3 compound them


def _reference(out, shards, *extra):
    trainer = Trainer(load_config(gw.DEMO, gw.OVERRIDES + [f"train.out_dir={out}", f"data.sources=[{{path: {shards}}}]", *extra]))
    gw.inject(trainer, vetoing_rank=True)
    return gw.summary(trainer, trainer.fit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_shards):
    return _reference(tmp_path_factory.mktemp("guard-ref"), embedded_shards)


@pytest.fixture(scope="module")
def reference_bf16(tmp_path_factory, embedded_shards):
    return _reference(tmp_path_factory.mktemp("guard-ref-bf16"), embedded_shards, "train.precision=bf16")


@pytest.fixture(scope="module")
def results(tmp_path_factory, embedded_shards):
    tmp = tmp_path_factory.mktemp("guard-dist")
    return launch_worker("guard_worker.py", 2, [str(embedded_shards), str(tmp / "runs"), *CASES], tmp)


EXPECTED_EVENTS = [
    ("skip", "nonfinite", 3, 2, None, None),
    ("skip", "spike", 5, 4, None, None),  # rank 1's veto alone
    ("skip", "spike", 7, 6, None, None),
    ("skip", "spike", 8, 7, None, None),
    ("rollback", None, 8, None, [6, 8], "step_00000006"),
]


def _close(a: float, b: float, rel: float = REL) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel)


def test_single_process_reference_follows_the_script(reference):
    assert [r["step"] for r in reference["history"]] == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10]
    assert [r["data_step"] for r in reference["history"]] == list(range(12))
    assert [tuple(e.values()) for e in reference["events"]] == EXPECTED_EVENTS


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_guard_decisions_agree_across_ranks_and_match_single_process(results, reference, reference_bf16, case):
    # bf16: DeepSpeed keeps bf16 weights (fp32 masters), the single process autocasts: the
    # decisions must be the same, the numbers only roughly
    bf16 = case.endswith("_bf16")
    reference, rel = (reference_bf16, 3e-2) if bf16 else (reference, REL)
    result = results[case]
    assert "error" not in result, f"{case}: {result}"
    rank0, rank1 = result
    decisions = lambda h: [(r["step"], r["data_step"], r["skipped_nonfinite"], r["skipped_spike"], r["rollbacks"]) for r in h]  # noqa: E731
    assert decisions(rank0["history"]) == decisions(rank1["history"]) == decisions(reference["history"])
    assert [tuple(e.values()) for e in rank0["events"]] == EXPECTED_EVENTS
    for a, b, ref in zip(rank0["history"], rank1["history"], reference["history"]):
        assert a["loss"] == b["loss"] or math.isnan(a["loss"]) and math.isnan(b["loss"])
        assert _close(a["loss"], ref["loss"], rel), (case, a, ref)
    assert rank0["weights"] == rank1["weights"]
    assert rank0["rank0_gather_ok"] and rank1["rank0_gather_ok"]  # the save path's rank-0-only gather
    for name, value in reference["weights"].items():
        assert rank0["weights"][name] == pytest.approx(value, rel=rel, abs=1e-4 if not bf16 else 1.0), (case, name)


@pytest.mark.slow
def test_a_hung_rank_gives_the_timeout_message_instead_of_a_hang(tmp_path, embedded_shards):
    from tests.train import timeout_worker as tw

    result = launch_worker("timeout_worker.py", 2, [str(embedded_shards), str(tmp_path / "run")], tmp_path)
    message = result["message"]
    assert message.startswith("rank 0: a collective failed at step 2 (")
    assert "likely cause: another rank stopped taking part (hung" in message
    assert f"train.collective_timeout_s={float(tw.TIMEOUT_S)}" in message and "train.resume=true" in message
    assert result["seconds"] < tw.SLEEP_S  # it failed when the timeout ran out, not when rank 1 came back
