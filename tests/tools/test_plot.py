"""tools.plot on a synthetic metrics.jsonl."""

import json
import math

import pytest

from tests.conftest import run_module
from tools.plot import bucket_keys, default_window, main, plot_run, read_metrics, series, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps=30, buckets=5, resumed_from=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 8.0 * math.exp(-s / 10) + 2, "lr": 1e-3, "grad_norm": 1.0, "seq_len": 128,
               "tokens_per_s": 1000.0 + s, "step_time_s": 0.1, "mem_gb": 1.0}
        rec.update({f"loss_t{i}": (i + 1) * rec["loss"] / buckets for i in range(buckets)})
        if s % 10 == 0:
            rec["eval_bound"] = rec["loss"] + 0.1
        lines.append(json.dumps(rec))
    if resumed_from is not None:  # a resumed run re-logs steps after its checkpoint
        for s in range(resumed_from + 1, steps + 1):
            lines.append(json.dumps({"step": s, "loss": 1.0, "tokens_per_s": 5.0}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_reads_and_dedupes(tmp_path):
    write_metrics(tmp_path, steps=20, resumed_from=15)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert recs[-1]["loss"] == 1.0  # later record wins
    assert bucket_keys(recs) == [f"loss_t{i}" for i in range(5)]
    steps, vals = series(recs, "eval_bound")
    assert steps == [10]


def test_plot_writes_pngs(tmp_path):
    write_metrics(tmp_path / "run")
    paths = plot_run(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in paths) == ["loss.png", "loss_by_t.png", "throughput.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli(tmp_path, capsys):
    write_metrics(tmp_path / "run", steps=5)
    proc = run_module(["-m", "tools.plot", str(tmp_path / "run")])  # the one `python -m tools.plot` run
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()
    assert "throughput.png" in proc.stdout
    assert main([str(tmp_path / "nothing")]) != 0
    assert capsys.readouterr().err.startswith("error: no metrics file")


def test_bad_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not a JSON object"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_smooth_is_a_centred_moving_average():
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert smooth([1.0, 5.0], 1) == [1.0, 5.0]
    assert smooth([], 5) == []
    assert smooth([2.0] * 7, 4) == [2.0] * 7
    assert default_window(10) == 3 and default_window(90) == 9


def test_smoothing_makes_a_small_batch_bucket_curve_readable():
    # a per-step bucket loss at the demo's batch (a few sequences per bucket): trend + large noise
    import random

    rng = random.Random(0)
    trend = [8.0 - 3.0 * s / 90 for s in range(90)]
    noisy = [v + rng.gauss(0, 0.6) for v in trend]
    smoothed = smooth(noisy, default_window(len(noisy)))
    err = lambda xs: math.sqrt(sum((x - t) ** 2 for x, t in zip(xs, trend)) / len(xs))  # noqa: E731
    assert err(smoothed) < err(noisy) / 2


def test_references_and_smoothing_options(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    paths = plot_run(tmp_path / "run", smooth_window=1, references={"unigram entropy": 6.6})
    assert all(p.is_file() for p in paths)
    assert main([str(tmp_path / "run"), "--smooth", "5", "--hline", "unigram entropy=6.6", "--hline", "bigram=5.1"]) == 0
    assert "loss_by_t.png" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:  # argparse's error exit
        main([str(tmp_path / "run"), "--hline", "unigram=abc"])
    assert bad.value.code == 2 and "expected LABEL=NUMBER" in capsys.readouterr().err


def test_eval_only_record_at_step_zero(tmp_path):
    # eval.at_start logs {"step": 0, "eval_bound": ...} with no training loss
    write_metrics(tmp_path / "run", steps=10)
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "eval_bound": 8.3}) + "\n" + path.read_text())
    recs = read_metrics(path)
    assert series(recs, "eval_bound") == ([0, 10], [8.3, recs[-1]["eval_bound"]])
    assert series(recs, "loss")[0][0] == 1
    assert len(plot_run(tmp_path / "run")) == 3
