"""Load a model and its tokenizer for inference (generate, eval, benchmarks).

``load_for_inference(path)`` accepts:

- a training run folder, its ``checkpoints/`` folder, or one ``checkpoints/step_XXXXXXXX/`` folder
  (weights via ``train.checkpoint.load_model_weights``; tokenizer from the checkpoint's
  ``tokenizer/``, else the run folder's ``tokenizer/``);
- a Hugging Face export folder (it has ``config.json``; weights via ``model.hf.load_hf_dir``,
  tokenizer from the same folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model.config import ModelConfig
from model.hf import DTYPES as HF_DTYPES
from model.llada import LLaDAModel

DTYPES = {**HF_DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp32"``/... -> torch dtype; one clear error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def model_from_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], device="cpu", dtype=torch.float32) -> LLaDAModel:
    """An eval-mode ``LLaDAModel`` holding ``state_dict`` (names checked strictly)."""
    with torch.device("meta"):
        model = LLaDAModel(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device=device, dtype=dtype).eval()


def _training_checkpoint(path: Path) -> tuple[ModelConfig, dict, Path | None]:
    from train.checkpoint import load_model_weights, resolve_checkpoint

    config, state = load_model_weights(path)
    ckpt = resolve_checkpoint(path)
    candidates = [ckpt / "tokenizer", ckpt.parent.parent / "tokenizer", path / "tokenizer"]
    tokenizer_dir = next((c for c in candidates if c.is_dir()), None)
    return config, state, tokenizer_dir


def _hf_export(path: Path) -> tuple[ModelConfig, dict, Path | None]:
    from model.hf import load_hf_dir  # lazy: HF conversion is optional for training checkpoints

    config, state = load_hf_dir(path)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return config, state, path if has_tokenizer else None


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """The tokenizer of a local folder (never the network, never remote code): a
    ``PreTrainedTokenizerFast`` when it has ``tokenizer.json`` (LLaDA's and ours), else
    ``AutoTokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)


def load_for_inference(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    require_tokenizer: bool = True,
):
    """``(LLaDAModel in eval mode on device/dtype, tokenizer)`` from a run, checkpoint or HF folder.

    Raises ``FileNotFoundError`` naming the path when it holds no model, or no tokenizer (unless
    ``require_tokenizer=False``, which returns ``None`` for it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if (path / "config.json").is_file():
        config, state, tokenizer_dir = _hf_export(path)
    else:
        config, state, tokenizer_dir = _training_checkpoint(path)
    model = model_from_state_dict(config, state, device=device, dtype=parse_dtype(dtype))
    if tokenizer_dir is None:
        if require_tokenizer:
            raise FileNotFoundError(f"no tokenizer found for {path} (expected a tokenizer/ folder or tokenizer.json)")
        return model, None
    return model, load_tokenizer(tokenizer_dir)


def special_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the tokenizer has it as one token (e.g. ``<|eot_id|>``), else None."""
    if tokenizer is None:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)
