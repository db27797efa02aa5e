"""The README's bad-input table, row by row: ``python -m train`` (its ``main``, in-process) prints
one line naming the problem, exits non-zero and leaves an existing run untouched."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from train.__main__ import main

DEMO = str(REPO / "configs" / "demo.yaml")
SMALL = [
    "logging.wandb=disabled", "logging.progress_bar=false", "eval.every=0", "model.n_layers=1",
    "model.d_model=64", "model.mlp_hidden_size=128", "train.seq_len=32", "train.global_batch_size=4",
    "train.micro_batch_size=4", "train.max_steps=1", "train.warmup_steps=0",
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_shards) -> Path:
    """A finished one-step run (one checkpoint) to resume from."""
    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    assert main([DEMO, *SMALL, f"train.out_dir={out}", f"data.sources=[{{path: {embedded_shards}}}]"]) == 0
    return out


def _damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    weights = next((copy / "checkpoints").glob("step_*/dcp/__0_0.distcp"))
    weights.write_bytes(b"0123456789")
    return copy


def _broken_shards(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    (copy / "manifest.json").write_text("{bad json")
    return copy


# (overrides, or a function (run, shards, tmp_path) -> overrides; the last line's start, or a
# regex for all of it; exit code)
ROWS = [
    (["train.lr=-1"], "config error: bad value for 'train.lr': -1.0 (must be positive)", 2),
    (["train.global_batch_size=7"], "config error: train.global_batch_size (7) must be a multiple of train.micro_batch_size (4)", 2),
    (["train.precision=fp16"], "config error: bad value for 'train.precision': 'fp16' (choose from fp32, bf16)", 2),
    (["train.bogus=1"], "config error: unknown config key 'train.bogus'", 2),
    (["parallel.tp=3"], "error: parallel config: world size 1 is not a multiple of parallel.tp × parallel.pp = 3×1 = 3", 2),
    (["data.sources=[{path: /nowhere}]"], "config error: data.sources[0].path does not exist: /nowhere", 2),
    (lambda run, shards, tmp: [f"data.sources=[{{path: {_broken_shards(shards, tmp)}}}]"],
     re.compile(r"error: \S+/manifest\.json: not valid JSON \(Expecting property name.*\)"), 2),
    (["model.vocab_size=10", "model.embedding_size=10"], "config error: the data's tokenizer has 4096 tokens but model.vocab_size is 10", 2),
    (["model.mask_token_id=5"], "config error: model.mask_token_id (5) differs from the tokenizer's mask token id (2,", 2),
    (["train.init_from=/nope"], "config error: train.init_from does not exist: /nope", 2),
    (lambda run, shards, tmp: [f"train.out_dir={run}", "train.resume=true", "model.d_model=128", "model.mlp_hidden_size=256"],
     re.compile(r"config error: checkpoint \S+/step_00000001 was written for a different model \(differs in: d_model, mlp_hidden_size\)"), 2),
    (lambda run, shards, tmp: [f"train.out_dir={_damaged_copy(run, tmp)}", "train.resume=true"],
     re.compile(r"config error: resume: every checkpoint in \S+/checkpoints is damaged \(see above\)"), 2),
    (["guard.t_buckets=0"], "config error: bad value for 'guard.t_buckets': 0 (must be positive)", 2),
    (["guard.spike_ema=1.0"], "config error: bad value for 'guard.spike_ema': 1.0 (must be in [0, 1))", 2),
]


@pytest.mark.parametrize("row", range(len(ROWS)))
def test_bad_input_gives_one_line_and_leaves_the_run_untouched(row, run, embedded_shards, tmp_path, capsys):
    overrides, expected, code = ROWS[row]
    before = _snapshot(run)
    if callable(overrides):
        overrides = overrides(run, embedded_shards, tmp_path)
    argv = [DEMO, *SMALL, f"train.out_dir={tmp_path / 'out'}", f"data.sources=[{{path: {embedded_shards}}}]", *overrides]
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if isinstance(expected, str):
        assert lines[-1].startswith(expected), err
    else:
        assert expected.fullmatch(lines[-1]), err
    assert sum("error" in line for line in lines) == 1, err
    assert _snapshot(run) == before  # nothing of the existing run was written
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_the_resume_mismatch_names_the_differing_keys(run, embedded_shards, tmp_path, capsys):
    argv = [DEMO, *SMALL, f"train.out_dir={run}", f"data.sources=[{{path: {embedded_shards}}}]", "train.resume=true",
            "model.d_model=128", "model.mlp_hidden_size=256"]
    assert main(argv) == 2
    assert "was written for a different model (differs in: d_model, mlp_hidden_size)" in capsys.readouterr().err
