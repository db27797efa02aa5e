"""The README's bad-input table, row by row: ``python -m train`` (its ``main``, in-process) prints
one line naming the problem, exits non-zero and leaves an existing run untouched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
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


def _shards_with(shards: Path, tmp_path: Path, damage) -> str:
    """data.sources naming a copy of the shard folder that ``damage(copy)`` changed."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    damage(copy)
    return f"data.sources=[{{path: {copy}}}]"


def _swap_two_ids(copy: Path) -> None:
    path = copy / "tokenizer" / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))


def _truncate_tokenizer(copy: Path) -> None:
    path = copy / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:3000])


def _shards_not_a_list(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"] = {"shard_00000": manifest["shards"][0]}
    (copy / "manifest.json").write_text(json.dumps(manifest))


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


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
    # issue 21: impossible hyper-parameters fail at start (7, 13)
    (["train.lr=inf"], "config error: bad value for 'train.lr': inf (must be a finite number)", 2),
    (["train.adam_eps=0"], "config error: bad value for 'train.adam_eps': 0.0 (must be positive)", 2),
    (["train.weight_decay=nan"], "config error: bad value for 'train.weight_decay': nan (must be a finite number)", 2),
    (["train.seed=1e20"], "config error: bad value for 'train.seed': Value '1e+20' of type 'float' could not be converted to Integer", 2),
    (["train.seed=100000000000000000000"], "config error: bad value for 'train.seed': 100000000000000000000 (must be an integer in [0, 2**63))", 2),
    (["eval.every=1", "eval.batches=0"], "config error: bad value for 'eval.batches': 0 (must be positive when eval.every > 0)", 2),
    (lambda run, shards, tmp: [f"data.sources=[{{path: {shards}, weight: .inf}}]"],
     "config error: bad value for 'data.sources[0].weight': inf (must be a finite number)", 2),
    (["train.attention_backend=flash"], "config error: train.attention_backend=flash: attention backend 'flash' needs flash_attn, which is not installed or does not import with this torch/CUDA; install it or use attention_backend=auto (SDPA)", 2),
    (lambda run, shards, tmp: [f"train.out_dir={_a_file(tmp)}"],
     re.compile(r"error: train\.out_dir \S+/a_file is an existing file, not a folder; choose another train\.out_dir"), 2),
    # issue 21: the shard folder's tokenizer and manifest (3, 12, 13)
    (lambda run, shards, tmp: [_shards_with(shards, tmp, _swap_two_ids)],
     re.compile(r"error: the shards' tokenizer \S+/shards/tokenizer differs from the tokenizer the shards were made "
                r"with \(fingerprint in \S+/shards/manifest\.json\)"), 2),
    (lambda run, shards, tmp: [_shards_with(shards, tmp, lambda c: shutil.rmtree(c / "tokenizer"))],
     re.compile(r"error: the shards' tokenizer: no such folder: \S+/shards/tokenizer"), 2),
    (lambda run, shards, tmp: [_shards_with(shards, tmp, _truncate_tokenizer)],
     re.compile(r"error: \S+/shards/tokenizer/tokenizer\.json: not valid JSON \(.*\); the file is damaged or truncated"), 2),
    (lambda run, shards, tmp: [_shards_with(shards, tmp, _shards_not_a_list)],
     re.compile(r"error: \S+/shards/manifest\.json: 'shards' must be a list of shard entries \(name, tokens, documents, sha256\), got dict"), 2),
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


# ----- issue 21: commands and inputs outside the row table ----------------------------------------
def _argv(out, shards, *extra):
    return [DEMO, *SMALL, f"train.out_dir={out}", f"data.sources=[{{path: {shards}}}]", *extra]


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum("error" in line for line in lines) <= 1, err
    return lines[-1]


def test_resuming_past_max_steps_is_an_error_and_at_max_steps_a_no_op(run, embedded_shards, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(_argv(copy, embedded_shards, "train.max_steps=2")) == 0  # a run at step 2
    before = _snapshot(copy)
    capsys.readouterr()
    assert main(_argv(copy, embedded_shards, "train.resume=true", "train.max_steps=1")) == 2
    assert re.fullmatch(r"config error: resume: \S+/step_00000002 is at step 2, past train\.max_steps=1; raise "
                        r"train\.max_steps to train on, or use another train\.out_dir to start over",
                        _last_line(capsys.readouterr().err))
    assert main(_argv(copy, embedded_shards, "train.resume=true", "train.max_steps=2")) == 0
    assert "done: already at step 2 = train.max_steps; nothing to train" in capsys.readouterr().out
    assert _snapshot(copy) == before  # no checkpoint re-written


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder(embedded_shards, tmp_path, capsys):
    from tests.train.test_runlock import lock_held_elsewhere

    out = tmp_path / "busy"
    with lock_held_elsewhere(out) as holder:
        capsys.readouterr()
        assert main(_argv(out, embedded_shards)) == 2
        line = _last_line(capsys.readouterr().err)
        assert line.startswith(f"error: train.out_dir {out} is in use by another run (pid {holder.pid} on "), line
        assert "train.runlock" in line and line.endswith("or choose another train.out_dir")
        assert not (out / "checkpoints").exists()
    assert main(_argv(out, embedded_shards)) == 0  # the kernel dropped the dead holder's lock


def _signal_at(trainer, step: int, sig: int):
    original = trainer.train_step

    def step_then_signal():
        values = original()
        if trainer.step == step:
            os.kill(os.getpid(), sig)
        return values

    trainer.train_step = step_then_signal
    return trainer


def test_ctrl_c_saves_like_sigterm_and_the_handlers_are_restored(embedded_shards, tmp_path):
    from train.config import load_config
    from train.metrics import EventLog
    from train.trainer import Trainer

    before = signal.getsignal(signal.SIGINT)
    cfg = load_config(DEMO, [*SMALL[:-2], "train.max_steps=5", "train.warmup_steps=0", f"train.out_dir={tmp_path}",
                             f"data.sources=[{{path: {embedded_shards}}}]"])
    trainer = _signal_at(Trainer(cfg), 2, signal.SIGINT)
    history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2] and trainer.preempted
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    events = [e for e in EventLog(str(tmp_path), enabled=True).read() if e["event"] == "preempted"]
    assert [(e["step"], e["signal_name"]) for e in events] == [(2, "SIGINT")]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_signal_during_setup_exits_0_at_once(embedded_shards, tmp_path, capsys, monkeypatch):
    import train.trainer as trainer_module

    real = trainer_module.build_loader

    def loader_then_sigterm(*args, **kwargs):
        loader = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return loader

    monkeypatch.setattr(trainer_module, "build_loader", loader_then_sigterm)
    assert main(_argv(tmp_path, embedded_shards)) == 0
    assert _last_line(capsys.readouterr().err) == "stopped: signal SIGTERM during setup: nothing trained yet; exiting"
    assert not (tmp_path / "checkpoints").exists()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_a_failed_collective_is_one_line(embedded_shards, tmp_path, capsys, monkeypatch):
    import train.trainer as trainer_module

    def dead_peer(self):
        raise trainer_module.CollectiveError(
            "rank 1: a collective failed at step 3 ([gloo] Connection closed by peer); likely cause: another rank died"
        )

    monkeypatch.setattr(trainer_module.Trainer, "fit", dead_peer)
    assert main(_argv(tmp_path, embedded_shards)) == 1
    assert _last_line(capsys.readouterr().err) == (
        "error: rank 1: a collective failed at step 3 ([gloo] Connection closed by peer); likely cause: another rank died"
    )


def test_a_string_where_the_model_config_wants_an_integer(tmp_path):
    from train.config import ConfigError, load_model_config

    (tmp_path / "m.yaml").write_text('d_model: "128"\nn_layers: 1\n')
    with pytest.raises(ConfigError, match=r"m\.yaml: model config: d_model must be an integer, got '128' \(str\)$"):
        load_model_config(tmp_path / "m.yaml")


def test_data_prepare_with_a_folder_that_is_not_a_tokenizer(tmp_path, capsys):
    from data.prepare import main as prepare_main

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "notes.txt").write_text("hello")
    (tmp_path / "in.txt").write_text("a document")
    assert prepare_main(["--input", str(tmp_path / "in.txt"), "--tokenizer", str(tmp_path / "tok"),
                         "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    assert _last_line(capsys.readouterr().err) == (
        f"error: --tokenizer: {tmp_path / 'tok'} is not a tokenizer folder (none of tokenizer.json, "
        "tokenizer_config.json, tokenizer.model, spiece.model, vocab.json, vocab.txt in it)"
    )


@pytest.fixture(scope="module")
def hf_export(run, tmp_path_factory) -> Path:
    from tools import convert_to_hf

    out = tmp_path_factory.mktemp("hf") / "hf"
    convert_to_hf.convert_checkpoint(run, out, dtype="fp32", max_shard_size="100KB")
    return out


def _damaged_hf(hf_export: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "hf"
    shutil.copytree(hf_export, copy)
    damage(copy)
    return copy


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _index_outside(folder: Path) -> None:
    def edit(index):
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = "../elsewhere.safetensors"
        return index

    _edit_json(folder / "model.safetensors.index.json", edit)


HF_ROWS = [
    (lambda f: _first_shard(f).write_bytes(_first_shard(f).read_bytes()[:5000]),
     r"error: \S+/model-00001-of-\d+\.safetensors: not a readable safetensors file \(Error while deserializing header: "
     r".*\); it is damaged or truncated"),
    (lambda f: _first_shard(f).write_bytes(b"garbage" * 100),
     r"error: \S+/model-00001-of-\d+\.safetensors: not a readable safetensors file \(.*\); it is damaged or truncated"),
    (lambda f: (f / "config.json").write_text("[1, 2, 3]"), r"error: \S+/config\.json: expected a JSON object \(\{\.\.\.\}\), got a list"),
    (lambda f: _edit_json(f / "config.json", lambda c: {**c, "d_model": "64"}),
     r"error: \S+/config\.json: model config: d_model must be an integer, got '64' \(str\)"),
    (_index_outside, r"error: \S+/model\.safetensors\.index\.json: shard '\.\./elsewhere\.safetensors' is not a file of \S+ "
                     r"\(the index must name files in its own folder\)"),
]


@pytest.mark.parametrize("row", range(len(HF_ROWS)))
def test_convert_from_hf_bad_input_is_one_line(row, hf_export, tmp_path, capsys):
    from tools import convert_from_hf

    damage, expected = HF_ROWS[row]
    folder = _damaged_hf(hf_export, tmp_path, damage)
    assert convert_from_hf.main([str(folder), str(tmp_path / "out")]) == 1
    assert re.fullmatch(expected, _last_line(capsys.readouterr().err))
    assert not (tmp_path / "out").exists()
