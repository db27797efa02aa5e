"""train.checkpoint: chunk geometry, integrity at every reader, atomic and failing saves, broken
``latest`` pointers, stale temporary folders and bad input (one line each, nothing overwritten)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.test_bad_inputs import DEMO, SMALL, _snapshot
from train.__main__ import main
from train.checkpoint import (
    MANIFEST,
    MODEL_PREFIX,
    CheckpointError,
    Checkpointer,
    Sharded,
    checked_checkpoint,
    fragment_chunks,
    flat_range_chunks,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    resume_candidates,
    save_checkpoint,
    verify_checkpoint,
    whole,
)


# ----- geometry --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (5, 4), (3, 1), (1, 9)])
def test_flat_ranges_become_at_most_three_rectangles_that_cover_exactly_the_range(shape):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    n = full.numel()
    for start in range(n):
        for numel in range(1, n - start + 1):
            flat = full.reshape(-1)[start:start + numel].clone()
            chunks = fragment_chunks(flat, shape, start, (0,) * len(shape))
            assert len(chunks) <= 3
            seen = torch.zeros(shape, dtype=torch.int32)
            for c in chunks:
                region = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
                assert torch.equal(full[region], c.tensor)  # the view holds exactly that rectangle
                assert c.tensor.data_ptr() >= flat.data_ptr()  # a view of the fragment, no copy
                seen[region] += 1
            want = torch.zeros(n, dtype=torch.int32)
            want[start:start + numel] = 1
            assert torch.equal(seen.reshape(-1), want)


def test_flat_range_chunks_refuses_three_dimensions():
    with pytest.raises(ValueError, match="1-D and 2-D"):
        flat_range_chunks((2, 2, 2), 0, 3)


def _ckpt(tmp_path: Path, step: int = 1, value: float = 1.0) -> Path:
    state = {MODEL_PREFIX + "w": whole(torch.full((4, 8), value)), "optim/w/exp_avg": whole(torch.zeros(4, 8))}
    return save_checkpoint(tmp_path, step, state=state, trainer_state={}, config_yaml="model: {}\n", tokenizer_dir=None)


def test_resharded_read_of_part_of_a_tensor(tmp_path):
    """A rank asking for other rectangles than were written gets exactly their elements."""
    full = torch.arange(32.0).reshape(4, 8)
    save_checkpoint(tmp_path, 1, state={"model/w": Sharded((4, 8), torch.float32, fragment_chunks(
        full.reshape(-1)[:13], (4, 8), 0, (0, 0)) + fragment_chunks(full.reshape(-1)[13:], (4, 8), 13, (0, 0)))},
        trainer_state={}, config_yaml="", tokenizer_dir=None)
    part = torch.zeros(4, 3)  # a column block: overlaps all four written rectangles
    from train.checkpoint import Chunk

    load_state(latest_checkpoint(tmp_path), {"model/w": Sharded((4, 8), torch.float32, [Chunk((0, 5), (4, 3), part)])})
    assert torch.equal(part, full[:, 5:])


# ----- bad input: one line, nothing overwritten ---------------------------------------------------
def test_other_model_shape_missing_file_and_unknown_version_are_one_line(tmp_path):
    ckpt = _ckpt(tmp_path)
    with pytest.raises(CheckpointError, match=r"model/w has shape \(4, 8\) in the checkpoint, the model \(4, 9\)") as e:
        load_state(ckpt, {"model/w": whole(torch.zeros(4, 9))})
    assert str(ckpt) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"has no tensor 'model/v'"):
        load_state(ckpt, {"model/v": whole(torch.zeros(4, 8))})
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    assert "unknown checkpoint format 'difftron-dcp' version 99" in verify_checkpoint(ckpt)
    assert str(ckpt / MANIFEST) in verify_checkpoint(ckpt)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    (ckpt / "dcp" / "__0_0.distcp").unlink()  # one rank's file is gone
    assert verify_checkpoint(ckpt) == f"{ckpt / 'dcp' / '__0_0.distcp'} is missing"
    with pytest.raises(CheckpointError, match=r"damaged checkpoint .*__0_0\.distcp is missing"):
        checked_checkpoint(tmp_path)


def test_old_unsharded_format_is_refused_in_one_line(tmp_path):
    old = tmp_path / "checkpoints" / "step_00000001"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoints" / "latest").write_text(old.name)
    with pytest.raises(CheckpointError, match="old unsharded format .*no longer reads"):
        checked_checkpoint(tmp_path)


def test_metadata_is_not_an_arbitrary_pickle(tmp_path):
    import pickle

    ckpt = _ckpt(tmp_path)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(shutil.rmtree))  # would be callable on load
    with pytest.raises(CheckpointError, match=r"\.metadata is unreadable \(unexpected object shutil\.rmtree"):
        load_state(ckpt, {"model/w": whole(torch.zeros(4, 8))})


# ----- saves that fail -----------------------------------------------------------------------------
def test_disk_full_is_one_line_with_the_bytes_needed_and_leaves_no_trace(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    _ckpt(tmp_path, 1)
    before = _snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_files_from_queue", full)
    with pytest.raises(CheckpointError) as e:
        _ckpt(tmp_path, 2)
    line = str(e.value)
    assert "\n" not in line and "disk full while saving checkpoint" in line
    assert str(tmp_path / "checkpoints" / "step_00000002") in line
    assert "needs about 256 bytes" in line  # two 4x8 fp32 tensors
    assert _snapshot(tmp_path) == before  # latest, the old checkpoint, no .tmp- left


def test_stale_temporaries_are_removed_at_start(tmp_path, embedded_shards, capsys):
    out = tmp_path / "run"
    stale = out / "checkpoints" / "step_00000009.tmp-4242"
    (stale / "dcp").mkdir(parents=True)
    (stale / "dcp" / "__0_0.distcp").write_bytes(b"x" * 100)
    assert main([DEMO, *SMALL, f"train.out_dir={out}", f"data.sources=[{{path: {embedded_shards}}}]"]) == 0
    assert not stale.exists()
    assert "removed 1 unfinished save(s): step_00000009.tmp-4242" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name] == []


# ----- `latest` that points nowhere -----------------------------------------------------------------
def test_latest_naming_a_deleted_folder_with_nothing_left_is_an_error(tmp_path, embedded_shards, capsys):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("step_00000005")
    with pytest.raises(CheckpointError, match="refusing to start from step 0"):
        resume_candidates(tmp_path / "run")
    argv = [DEMO, *SMALL, f"train.out_dir={tmp_path / 'run'}", f"data.sources=[{{path: {embedded_shards}}}]",
            "train.resume=true"]
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "names 'step_00000005', which does not exist" in err[0], err
    assert not list(root.glob("step_*"))  # no fresh start


def test_latest_naming_a_deleted_folder_falls_back_to_an_older_one(tmp_path):
    older = _ckpt(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    assert latest_checkpoint(tmp_path) == older


def test_latest_replaced_by_a_directory_is_one_line(tmp_path):
    _ckpt(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "latest").mkdir()
    with pytest.raises(CheckpointError, match=r"latest is not a file"):
        resume_candidates(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]


# ----- every reader verifies what it reads (issue 21, item 2) ----------------------------------------
@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory, embedded_shards) -> Path:
    """A finished one-step run whose checkpoint has one byte of its weights flipped (same size)."""
    out = tmp_path_factory.mktemp("flipped") / "run"
    assert main([DEMO, *SMALL, f"train.out_dir={out}", f"data.sources=[{{path: {embedded_shards}}}]"]) == 0
    flip_weight_byte(next((out / "checkpoints").glob("step_*")))
    return out


def flip_weight_byte(ckpt: Path, key: str = "model/transformer.wte.weight") -> None:
    """Flip one byte in the middle of the stored bytes of tensor ``key`` (the file keeps its size)."""
    from train.checkpoint import _make_reader

    storage = _make_reader(ckpt / "dcp", {}).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == key)
    data = ckpt / "dcp" / info.relative_path
    blob = bytearray(data.read_bytes())
    blob[info.offset + info.length // 2] ^= 0x40
    data.write_bytes(bytes(blob))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "__0_0.distcp fails its CRC-32 check" in lines[0], err
    return lines[0]


def test_convert_to_hf_refuses_a_flipped_byte(flipped_run, tmp_path, capsys):
    from tools import convert_to_hf

    assert convert_to_hf.main([str(flipped_run), str(tmp_path / "hf")]) == 1
    _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()


def test_generate_refuses_a_flipped_byte(flipped_run, capsys):
    from tools import generate

    assert generate.main(["--checkpoint", str(flipped_run), "--prompt", "hi", "--gen-length", "4"]) == 1
    _one_error_line(capsys.readouterr().err)


def test_init_from_refuses_a_flipped_byte(flipped_run, embedded_shards, tmp_path, capsys):
    argv = [DEMO, *SMALL, f"train.out_dir={tmp_path / 'new'}", f"data.sources=[{{path: {embedded_shards}}}]",
            f"train.init_from={flipped_run}"]
    capsys.readouterr()
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)
    assert not list((tmp_path / "new").glob("checkpoints/step_*"))


# ----- train.checkpoint.Checkpointer: a run's checkpoints, without a trainer -------------------------
class _Loader:
    """What the Checkpointer needs of a data loader."""

    tokenizer_path = None

    def __init__(self) -> None:
        self.state = {"next_step": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _checkpointer(folder: Path, seed: int):
    from omegaconf import OmegaConf

    from model.llada import build_model
    from tests.conftest import tiny_model_config
    from train.guards import GuardConfig, RunGuard
    from train.local_engine import LocalEngine

    config = tiny_model_config()
    engine = LocalEngine(build_model(config, seed=seed), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                         grad_clip=1.0, precision="fp32", device=torch.device("cpu"))
    run_guard = RunGuard(GuardConfig())
    yaml = OmegaConf.to_yaml(OmegaConf.create({"model": config.to_dict()}))
    return Checkpointer(folder, engine, loader=_Loader(), run_guard=run_guard, model_config=config,
                        config_yaml=yaml, keep_last=0, async_save=False), engine, run_guard


def test_checkpointer_saves_and_restores_the_engine_the_loader_and_the_guard(tmp_path):
    a, engine_a, guard_a = _checkpointer(tmp_path, seed=0)
    guard_a.skip_windows, guard_a.counts["spike"] = [[2, 4]], 3
    first = a.save(4, 6)
    guard_a.counts["rollbacks"] = 1
    second = a.save(8, 10)
    assert [(c.name, d) for c, d in a.saved_data_steps()] == [(second.name, 10), (first.name, 6)]
    b, engine_b, guard_b = _checkpointer(tmp_path, seed=1)
    assert b.restore(first) == (4, 6)
    assert b.loader.state == {"next_step": 6}
    assert guard_b.skip_windows == [[2, 4]] and guard_b.counts == {"nonfinite": 0, "spike": 3, "rollbacks": 0}
    want, got = engine_a.model_state_dict(), engine_b.model_state_dict()
    assert all(torch.equal(v, got[k]) for k, v in want.items())
    found = b.resume(log=print)
    assert found is not None and found[0] == second and found[1:] == (8, 10) and guard_b.counts["rollbacks"] == 1
    b.discard_after(first, is_logging_rank=True)
    assert [c.name for c, _ in b.saved_data_steps()] == [first.name]


def test_checkpointer_restores_older_state_files(tmp_path):
    a, _, _ = _checkpointer(tmp_path, seed=0)
    ckpt = a.save(5, 5)
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("data_step", "skip_windows", "guard_counts", "guard"):
        state.pop(key)
    state["skipped_steps"] = 2  # a checkpoint from before these fields existed
    (ckpt / "state.json").write_text(json.dumps(state))
    from train.checkpoint import _write_manifest

    _write_manifest(ckpt)  # the manifest covers state.json
    b, _, guard_b = _checkpointer(tmp_path, seed=1)
    assert b.restore(ckpt) == (5, 5)
    assert guard_b.counts == {"nonfinite": 2, "spike": 0, "rollbacks": 0} and guard_b.skip_windows == []
