"""The typed run configuration: YAML files plus ``key=value`` overrides, validated at start.

A run config has seven sections, each a dataclass owned by what it configures:

    model:    model.config.ModelConfig   (LLaDA's HF key names)
    train:    TrainConfig                (steps, batch, optimizer, schedule, objective, checkpoints)
    data:     data.config.DataConfig     (token shard sources and mixture weights)
    parallel: train.layout.ParallelConfig (tp, pp, zero_stage, ...)
    logging:  LoggingConfig              (console, metrics.jsonl, wandb)
    eval:     EvalConfig                 (in-training evaluation of the bound)
    guard:    train.guards.GuardConfig   (non-finite and loss-spike guards, rollback)

In a YAML file, ``model:`` may be a path to a model YAML (relative to the file, or to the current
directory), e.g. ``model: model/tiny.yaml``; on the command line ``model=configs/model/NAME.yaml``
replaces the file's model as a whole (``model.KEY=VALUE`` overrides then apply on top). A run config
must name its model: the schema's defaults are LLaDA-8B's, never built silently from an empty file.
Unknown keys, wrong types and impossible values fail in ``load_config`` with one ``ConfigError``
line that names the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.attention import BACKENDS as ATTENTION_BACKENDS
from model.config import ModelConfig
from train.guards import GuardConfig
from train.layout import ParallelConfig


class ConfigError(ValueError):
    """A bad configuration; its message is one line meant for the user."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    seq_len: int = 128
    micro_batch_size: int = 4
    global_batch_size: int = 16  # sequences per optimizer step, across all data-parallel ranks
    # AdamW
    lr: float = 4e-4  # peak learning rate
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    # Warmup-Stable-Decay (LLaDA): linear warmup to lr, hold, optionally step down to drop_lr at
    # drop_step, then decay linearly to final_lr over the last decay_steps steps.
    warmup_steps: int = 10
    drop_step: Optional[int] = None
    drop_lr: Optional[float] = None
    decay_steps: int = 0
    final_lr: float = 0.0
    # objective
    objective: str = "pretrain"  # "pretrain" or "sft" (prompt never masked; needs SFT shards)
    mask_eps: float = 1e-3  # p_mask = (1 - eps)·t + eps
    random_length_prob: float = 0.01  # fraction of steps trained on a random prefix length
    keyed_noise: bool = True  # noise = f(seed, step, global sample index): layout-independent
    stratified_t: bool = True  # one t per stratum of the global batch
    # run
    seed: int = 0
    out_dir: str = "runs/default"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; fp32 master weights)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    activation_checkpointing: str = "none"  # "none", "selective" or "full"
    attention_backend: str = "auto"  # "auto" (flash-attn on GPU when installed, else SDPA), "sdpa", "flash", ... (model/attention.py)
    compile: bool = False  # torch.compile each transformer block (GPU fast path; single-process engine)
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 3
    async_save: bool = False  # write checkpoints in a background thread once the state is copied to CPU
    resume: bool = False  # continue from <out_dir>/checkpoints/latest when there is one
    init_from: Optional[str] = None  # start from these weights (a checkpoint, run dir or converted HF model)
    # fault tolerance
    collective_timeout_s: float = 600.0  # a collective waiting longer than this fails (a rank died or hangs)


@dataclass
class LoggingConfig:
    log_every: int = 1
    t_buckets: int = 5
    wandb: str = "offline"  # "offline", "online" or "disabled"
    wandb_project: str = "difftron"
    run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class EvalConfig:
    every: int = 0  # evaluate the bound on the validation split every N steps (0: never)
    batches: int = 2
    seed: int = 1234  # fixed noise: the same masks at every evaluation
    at_start: bool = False  # also evaluate the initial weights (logged as step 0) on a fresh run


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None


def _read_model_file(ref: str, search_dirs: list[Path]) -> Any:
    """The mapping of a model YAML named by ``ref`` (absolute, or relative to one of ``search_dirs``)."""
    path = Path(ref)
    candidates = [path] if path.is_absolute() else [d / path for d in search_dirs]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = " and ".join(dict.fromkeys(str(d.resolve()) for d in search_dirs))
        raise ConfigError(f"model config file not found: {ref}" + ("" if path.is_absolute() else f" (looked in {where})"))
    raw = _read_yaml(found)
    # name what is wrong without echoing the file (it may be any file: `model: /etc/passwd`)
    if not OmegaConf.is_dict(raw) or not raw:
        raise ConfigError(f"{found}: not a model config (expected a mapping of model keys, e.g. configs/model/tiny.yaml)")
    known = {f.name for f in fields(ModelConfig)}
    unknown = [str(k) for k in raw if str(k) not in known]
    if unknown:
        key = unknown[0].splitlines()[0] if unknown[0].strip() else repr(unknown[0])
        key = key if len(key) <= 40 else key[:40] + "..."
        raise ConfigError(f"{found}: not a model config: unknown model key '{key}' (model keys: {', '.join(sorted(known)[:4])}, ...)")
    return raw


def _resolve_model_include(raw: Any, base_dir: Path) -> None:
    if "model" in raw and isinstance(raw["model"], str):
        raw["model"] = _read_model_file(raw["model"], [base_dir, Path.cwd(), base_dir.parent])


def _model_overrides(overrides: list[str], base_dir: Path) -> tuple[Any | None, list[str]]:
    """Split ``model=FILE`` (a model YAML on the command line) off the overrides.

    Like a config group in Hydra, the file (or an inline mapping, ``model={d_model: 64, ...}``)
    replaces the model section of the YAML as a whole, and ``model.KEY=VALUE`` overrides then apply
    on top of it wherever they stand on the line; the last ``model=`` wins."""
    model, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not (sep and key.strip() == "model"):
            rest.append(item)
            continue
        value = value.strip()
        if value.startswith("{"):
            try:
                model = OmegaConf.from_dotlist([f"model={value}"])["model"]
            except Exception as e:  # OmegaConf's and YAML's parse errors
                raise ConfigError(f"bad value for 'model': {str(e).splitlines()[0]}") from None
            if not OmegaConf.is_dict(model):
                raise ConfigError(f"bad value for 'model': {value} (a model YAML file or a mapping)")
        elif value:
            model = _read_model_file(value, [Path.cwd(), base_dir, base_dir.parent])
        else:
            raise ConfigError("override 'model=' names no model file (e.g. model=configs/model/tiny.yaml)")
    return model, rest


def _names_model(raw_files: list[Any]) -> bool:
    """Whether the YAML or ``model=`` on the command line named a model (the schema's defaults are
    LLaDA-8B's: an empty config must not silently build an 8B model)."""
    return any("model" in raw and raw["model"] is not None for raw in raw_files)


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0].strip()
    key = getattr(e, "full_key", None)
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'" if key else msg
    if key:
        return f"bad value for '{key}': {msg}"
    return msg


def merge_config(raw_files: list[Any], overrides: list[str]) -> RunConfig:
    """Merge YAML contents and ``key=value`` overrides onto the schema; return the dataclasses."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *raw_files, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)  # runs the dataclasses' __post_init__ checks
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    except ValueError as e:  # ModelConfig and other __post_init__ validation
        raise ConfigError(str(e).splitlines()[0]) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, *, check_paths: bool = True) -> RunConfig:
    """Load a run config from a YAML file (or only defaults + overrides when path is None)."""
    raw_files = []
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        base_dir = path.parent
        raw = _read_yaml(path)
        if raw is None or OmegaConf.is_dict(raw) and not raw:
            raw = OmegaConf.create({})  # an empty file: caught below as a config without a model
        if not OmegaConf.is_dict(raw):
            raise ConfigError(f"{path}: a run config must be a mapping of sections")
        if "model" in raw and raw["model"] is None:  # `model:` with nothing after it
            del raw["model"]
        _resolve_model_include(raw, path.parent)
        raw_files.append(raw)
    model_file, overrides = _model_overrides(list(overrides or []), base_dir)
    if model_file is not None:  # replaces the YAML's model section, not merged into it
        if raw_files:
            raw_files[0]["model"] = model_file
        else:
            raw_files.append(OmegaConf.create({"model": model_file}))
    cfg = merge_config(raw_files, overrides)
    if path is not None and not _names_model(raw_files):
        raise ConfigError(
            f"{path}: no model named: add `model: model/tiny.yaml` (a model YAML, relative to the config) "
            "or pass model=configs/model/NAME.yaml"
        )
    validate(cfg, check_paths=check_paths)
    return cfg


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """A ModelConfig from a model-only YAML or from a run config's ``model`` section."""
    path = Path(path)
    raw = _read_yaml(path)
    if OmegaConf.is_dict(raw) and "model" in raw:
        _resolve_model_include(raw, path.parent)
        raw = raw["model"]
    try:
        return ModelConfig.from_dict(OmegaConf.to_container(raw))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None


def validate(cfg: RunConfig, *, check_paths: bool = True) -> None:
    """Cross-field checks that a dataclass cannot do on its own. Raises ConfigError."""
    t = cfg.train
    choices = {
        "train.objective": (t.objective, ("pretrain", "sft")),
        "train.precision": (t.precision, ("fp32", "bf16")),
        "train.device": (t.device, ("auto", "cpu", "cuda")),
        "train.activation_checkpointing": (t.activation_checkpointing, ("none", "selective", "full")),
        "train.attention_backend": (t.attention_backend, ATTENTION_BACKENDS),
        "logging.wandb": (cfg.logging.wandb, ("offline", "online", "disabled")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"bad value for '{key}': {value!r} (choose from {', '.join(allowed)})")
    positive = {
        "train.max_steps": t.max_steps,
        "train.seq_len": t.seq_len,
        "train.micro_batch_size": t.micro_batch_size,
        "train.global_batch_size": t.global_batch_size,
        "logging.log_every": cfg.logging.log_every,
        "logging.t_buckets": cfg.logging.t_buckets,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"bad value for '{key}': {value} (must be positive)")
    if t.lr <= 0:
        raise ConfigError(f"bad value for 'train.lr': {t.lr} (must be positive)")
    _validate_numbers(cfg)
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"bad value for 'train.betas': {list(t.betas)} (two numbers in [0, 1))")
    if not 0 < t.mask_eps < 1:
        raise ConfigError(f"bad value for 'train.mask_eps': {t.mask_eps} (must be in (0, 1))")
    if not 0 <= t.random_length_prob <= 1:
        raise ConfigError(f"bad value for 'train.random_length_prob': {t.random_length_prob} (must be in [0, 1])")
    if t.seq_len > cfg.model.max_sequence_length:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) exceeds model.max_sequence_length ({cfg.model.max_sequence_length})"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})"
        )
    if (t.drop_step is None) != (t.drop_lr is None):
        raise ConfigError("train.drop_step and train.drop_lr must be set together")
    if t.warmup_steps < 0 or t.decay_steps < 0:
        raise ConfigError("train.warmup_steps and train.decay_steps must be >= 0")
    if check_paths:
        for i, src in enumerate(cfg.data.sources):
            if "://" not in src.path and not Path(src.path).exists() and not Path(src.path + ".idx").exists():  # dir or Megatron PREFIX
                raise ConfigError(f"data.sources[{i}].path does not exist: {src.path}")
        if t.init_from is not None and "://" not in t.init_from and not Path(t.init_from).exists():
            raise ConfigError(f"train.init_from does not exist: {t.init_from}")


SEED_LIMIT = 2**63  # seeds are hashed into 63-bit generator keys (model.objective.key_seed)


def _validate_numbers(cfg: RunConfig) -> None:
    """Hyper-parameters that would train on silently (inf/NaN, a zero epsilon) fail at start."""
    t, e = cfg.train, cfg.eval
    finite = {
        "train.lr": t.lr, "train.weight_decay": t.weight_decay, "train.adam_eps": t.adam_eps,
        "train.grad_clip": t.grad_clip, "train.final_lr": t.final_lr, "train.mask_eps": t.mask_eps,
        "train.random_length_prob": t.random_length_prob, "train.collective_timeout_s": t.collective_timeout_s,
        "data.validation_fraction": cfg.data.validation_fraction,
    }
    if t.drop_lr is not None:
        finite["train.drop_lr"] = t.drop_lr
    finite.update({f"train.betas[{i}]": b for i, b in enumerate(t.betas)})
    finite.update({f"data.sources[{i}].weight": s.weight for i, s in enumerate(cfg.data.sources)})
    for key, value in finite.items():
        if not math.isfinite(value):
            raise ConfigError(f"bad value for '{key}': {value} (must be a finite number)")
    positive = {"train.adam_eps": t.adam_eps, "train.collective_timeout_s": t.collective_timeout_s}
    positive.update({f"data.sources[{i}].weight": s.weight for i, s in enumerate(cfg.data.sources)})
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"bad value for '{key}': {value} (must be positive)")
    at_least_zero = {
        "train.weight_decay": t.weight_decay, "train.final_lr": t.final_lr, "train.checkpoint_every": t.checkpoint_every,
        "train.keep_last": t.keep_last, "eval.every": e.every,
    }
    if t.drop_lr is not None:
        at_least_zero["train.drop_lr"] = t.drop_lr
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"bad value for '{key}': {value} (must be >= 0)")
    if not 0 <= cfg.data.validation_fraction < 1:
        raise ConfigError(f"bad value for 'data.validation_fraction': {cfg.data.validation_fraction} (must be in [0, 1))")
    if cfg.data.mixture_block_size <= 0:
        raise ConfigError(f"bad value for 'data.mixture_block_size': {cfg.data.mixture_block_size} (must be positive)")
    for key, value in {"train.seed": t.seed, "eval.seed": e.seed}.items():
        if not 0 <= value < SEED_LIMIT:
            raise ConfigError(f"bad value for '{key}': {value} (must be an integer in [0, 2**63))")
    if e.every > 0 and e.batches <= 0:
        raise ConfigError(f"bad value for 'eval.batches': {e.batches} (must be positive when eval.every > 0)")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
