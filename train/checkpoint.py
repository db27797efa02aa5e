"""Training checkpoints: atomic save, ``latest`` pointer, keep-last-N, and loading.

Layout of a run's checkpoints::

    <out_dir>/checkpoints/
        step_00000100/
            model.safetensors   full fp32 weights in the model's names (LLaDA HF names minus "model.")
            optimizer.pt        AdamW state, unsharded: NAME::exp_avg, NAME::exp_avg_sq, ::step (tensors
                                only; loaded weights_only=True), so any layout can resume it
            state.json          step, schedule position, data-loader state, metrics counters
            rng.pt              torch RNG states (weights_only-loadable)
            config.yaml         the resolved run config
            tokenizer/          the tokenizer files, so the checkpoint describes itself
            manifest.json       size and CRC-32 of every other file, written last (see below)
        latest                  the name of the newest complete checkpoint

A checkpoint is written into ``step_X.tmp-<pid>`` and renamed into place only when complete,
then ``latest`` is replaced atomically; a crash mid-save leaves the previous one untouched.

``manifest.json`` guards against damage the rename cannot: a file truncated or corrupted after the
save (a full disk on a network filesystem, a bad copy). It records each file's size and CRC-32
(``zlib.crc32``: a checksum against accidents, not tampering; it runs at memory speed, several
times faster than SHA-256 on multi-GB weights). :func:`verify_checkpoint` re-reads every file and
:func:`newest_valid_checkpoint` falls back to the previous complete checkpoint when it fails.
Checkpoints written before manifests existed have none and are accepted unverified.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.config import ModelConfig

STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
_CHUNK = 16 << 20


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    trainer_state: dict,
    config_yaml: str,
    tokenizer_dir: str | os.PathLike | None,
    keep_last: int = 3,
    extra_writer=None,
) -> Path:
    """Write a complete checkpoint atomically and point ``latest`` at it. Returns its folder.

    ``extra_writer(tmp_dir)``, when given, writes additional files into the folder before it
    is renamed into place.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    if extra_writer is not None:
        extra_writer(tmp)
    _write_manifest(tmp)
    if final.exists():  # re-saving the same step (e.g. after a rollback): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    _prune(root, keep_last)
    return final


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: Path) -> None:
    """Record size and CRC-32 of every file under ``folder`` (relative POSIX paths) in manifest.json."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "crc32": _crc32(f)}
    (folder / MANIFEST).write_text(json.dumps({"algorithm": "crc32", "files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file of ``ckpt`` listed in its manifest is present with the recorded size and
    CRC-32 (or when it has no manifest); otherwise one line naming the first bad file."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for rel, want in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, expected {want['size']} (truncated?)"
        if _crc32(f) != want["crc32"]:
            return f"{f} fails its CRC-32 check (corrupted)"
    return None


def newest_valid_checkpoint(out_dir: str | os.PathLike, log=print) -> Path | None:
    """The newest checkpoint (``latest`` first, then older ones) that passes :func:`verify_checkpoint`.
    Each rejected one is reported through ``log`` in one line."""
    newest = latest_checkpoint(out_dir)
    if newest is None:
        return None
    candidates = [newest] + [p for p in reversed(list_checkpoints(out_dir)) if p.name < newest.name]
    for ckpt in candidates:
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"resume: skipping damaged checkpoint {ckpt.name}: {problem}")
    return None


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and ".tmp-" not in p.name)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and ".tmp-" not in p.name and (p / "state.json").is_file()
    )


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest``, or the newest complete one if the pointer is missing."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder or a run folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = latest_checkpoint(run_dir)
    if found is not None:
        return found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(f"no checkpoint in {path} (expected model.safetensors or checkpoints/latest)")


def read_model_config(ckpt: Path) -> ModelConfig:
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint has no config.yaml: {ckpt}")
    raw = OmegaConf.to_container(OmegaConf.load(cfg_file))
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{cfg_file}: no 'model' section")
    return ModelConfig.from_dict(raw["model"])


def load_model_weights(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full state dict) of a checkpoint, run folder or checkpoint folder."""
    ckpt = resolve_checkpoint(path)
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint has no model.safetensors: {ckpt}")
    return read_model_config(ckpt), load_file(weights)


def load_training_state_json(ckpt: Path) -> dict:
    """Only ``state.json`` of a checkpoint (step, data position, guard state)."""
    return json.loads((ckpt / "state.json").read_text())


def load_training_state(ckpt: Path) -> dict:
    """Optimizer state, trainer state and RNG of a checkpoint (no untrusted pickle)."""
    state = load_training_state_json(ckpt)
    optimizer = None
    if (ckpt / "optimizer.pt").is_file():
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    rng = torch.load(ckpt / "rng.pt", weights_only=True) if (ckpt / "rng.pt").is_file() else None
    return {"trainer": state, "optimizer": optimizer, "rng": rng}


def tokenizer_dir_of(ckpt: Path) -> Path | None:
    tok = ckpt / "tokenizer"
    return tok if tok.is_dir() else None
