"""The lm-eval adapter: lm-eval's own CLI runs the local tasks under tests/assets/lm_eval_tasks
(multiple choice, generation, perplexity) against a tiny model, on 1 and on 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "assets" / "lm_eval_tasks"
MODEL_ARGS = "mc_num=8,mc_batch_size=16,gen_length=8,steps=8,block_length=4,dtype=float32"


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The session's tiny model trained for a few steps on the embedded corpus (tests/conftest.py)."""
    return Path(tiny_run)


def run_cli(run_dir: Path, out: Path, launcher: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, "tools.eval", "--model", "difftron", "--model_args", f"pretrained={run_dir},{MODEL_ARGS}",
           "--tasks", "difftron_mc,difftron_gen,difftron_ppl", "--include_path", str(TASKS),
           "--output_path", str(out), "--log_samples", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1, list(out.rglob("*"))
    data = json.loads(results[0].read_text())
    data["_stdout"] = r.stdout
    data["_samples"] = {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in out.rglob("samples_*.jsonl")}
    return data


@pytest.fixture(scope="module")
def single(run_dir, tmp_path_factory):
    return run_cli(run_dir, tmp_path_factory.mktemp("out1"), [sys.executable, "-m"])


def test_cli_reports_metrics_for_local_tasks(single):
    res = single["results"]
    assert 0.0 <= res["difftron_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["difftron_mc"]["acc_norm,none"] <= 1.0
    assert 0.0 <= res["difftron_gen"]["exact_match,none"] <= 1.0
    assert res["difftron_ppl"]["bits_per_byte,none"] > 0
    assert "difftron_mc" in single["_stdout"]  # lm-eval's table
    assert single["config"]["model"] == "difftron"
    # every request got an answer of the right kind
    samples = single["_samples"]
    mc = next(v for k, v in samples.items() if "difftron_mc" in k)
    assert len(mc) == 4
    for s in mc:
        lls = [float(r[0][0]) for r in s["resps"]]  # lm-eval logs the (ll, is_greedy) pairs as strings
        assert all(ll < 0 for ll in lls)
    gen = next(v for k, v in samples.items() if "difftron_gen" in k)
    assert len(gen) == 3 and all(isinstance(s["resps"][0][0], str) and "\n" not in s["resps"][0][0] for s in gen)


@pytest.mark.slow
def test_two_ranks_give_the_same_metrics(run_dir, single, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    dp = run_cli(run_dir, tmp_path / "out2", launcher)
    for task in ("difftron_mc", "difftron_gen", "difftron_ppl"):
        for metric, value in single["results"][task].items():
            if isinstance(value, float):
                assert dp["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    n1 = sum(len(v) for v in single["_samples"].values())
    n2 = sum(len(v) for v in dp["_samples"].values())
    assert n1 == n2 == 4 + 3 + 2  # each document scored exactly once across ranks


def test_adapter_methods_directly(run_dir):
    from lm_eval.api.instance import Instance

    from model.likelihood import mc_loglikelihood
    from tools.lm_eval_model import DifftronLM

    lm = DifftronLM(pretrained=str(run_dir), mc_num=4, is_check_greedy=True, gen_length=8, block_length=4,
                    device="cpu")
    reqs = [Instance("loglikelihood", {}, ("Question: two plus two?\nAnswer:", " four"), 0),
            Instance("loglikelihood", {}, ("", "Paris"), 1)]
    out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(ll < 0 and isinstance(g, bool) for ll, g in out)
    ctx = lm.tok_encode("Question: two plus two?\nAnswer:")
    whole = lm.tok_encode("Question: two plus two?\nAnswer: four")
    assert out[0][0] == pytest.approx(mc_loglikelihood(lm.model, [(ctx, whole[len(ctx):])], mc_num=4, seed=lm.seed)[0])
    gens = lm.generate_until([Instance("generate_until", {}, ("The quick", {"until": ["zzz"], "max_gen_toks": 8}), 0),
                              Instance("generate_until", {}, ("Paris is the", {"until": ["zzz"], "max_gen_toks": 8}), 1)])
    assert len(gens) == 2 and all(isinstance(g, str) for g in gens)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The quick brown fox.",), 0)])
    assert rolling[0] < 0
    lm.gen_defaults["gen_length"] = None  # now the task's max_gen_toks sets the length
    with pytest.raises(ValueError, match="multiple of block_length"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"until": [], "max_gen_toks": 6}), 0)])


def test_cli_bad_model_path_is_one_error_line(tmp_path, capsys, monkeypatch):
    """Through ``tools.eval.main`` in this process (the ``single`` fixture runs the real CLI)."""
    from tools.eval import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = main(["--model", "difftron", "--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks", "difftron_mc",
               "--include_path", str(TASKS), "--device", "cpu"])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: model path not found: {tmp_path / 'missing'}"
