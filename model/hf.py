"""Adapter between difftron models and LLaDA's Hugging Face format.

Our parameter names are LLaDA's HF names without the leading ``model.``
(``transformer.blocks.3.q_proj.weight`` <-> ``model.transformer.blocks.3.q_proj.weight``), and
``ModelConfig`` uses LLaDA's ``config.json`` keys, so the adapter is a prefix plus the fixed
architecture flags of LLaDA's config. This module also reads HF directories (safetensors shards
through ``model.safetensors.index.json``) and checks names and shapes against a config.

The remote-code files that exports ship (``configuration_llada.py``, ``modeling_llada.py``) live
in ``model/hf_remote/`` (see ``remote_code_files``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

from model.config import ModelConfig

HF_PREFIX = "model."
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "hf_remote"
REMOTE_CODE_FILES = ("configuration_llada.py", "modeling_llada.py")

# Keys of LLaDA's config.json whose values are fixed by the architecture difftron implements.
# (Their LLaDA-8B values; config_from_hf rejects a config that sets any of them otherwise.)
ARCHITECTURE_FLAGS = {
    "activation_type": "silu",
    "alibi": False,
    "attention_layer_norm": False,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "include_bias": False,
    "include_qkv_bias": False,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rope": True,
    "scale_logits": False,
    "weight_tying": False,
}

# Keys of LLaDA's config.json that describe training-time or loading options, with LLaDA-8B's
# values; written unchanged into every export.
FIXED_KEYS = {
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope_full_precision": True,
    "use_cache": False,
}

# ModelConfig fields that are config.json keys with the same name and meaning.
CONFIG_FIELDS = (
    "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
    "max_sequence_length", "rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id", "pad_token_id",
    "init_std",
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----- names ------------------------------------------------------------------------------------
def to_hf_name(name: str) -> str:
    """``transformer.ln_f.weight`` -> ``model.transformer.ln_f.weight``."""
    return HF_PREFIX + name


def from_hf_name(name: str) -> str:
    """``model.transformer.ln_f.weight`` -> ``transformer.ln_f.weight``; other names are an error."""
    if not name.startswith(HF_PREFIX):
        raise ValueError(f"unknown tensor name {name!r}: LLaDA's HF tensor names start with {HF_PREFIX!r}")
    return name[len(HF_PREFIX):]


def expected_hf_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of an export of ``config``, in model order.

    Built from the real module on the meta device (no memory), so it always agrees with
    ``model.llada``. LLaDA-8B gives 291 tensors.
    """
    from model.llada import build_model  # local import: keeps name helpers import-light

    model = build_model(config, device="meta")
    return {to_hf_name(name): tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str
) -> None:
    """Raise ValueError naming the first problem: unknown names, missing names, or a shape that
    does not match the config (both shapes given). ``source`` names the file or folder."""
    unknown = [n for n in found if n not in expected]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ValueError(
            f"{source}: unknown tensor name(s) {', '.join(unknown[:3])}{more}; "
            "not part of LLaDA's architecture for this config"
        )
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {list(found[name])} but the config expects {list(shape)}"
            )


# ----- config ---------------------------------------------------------------------------------
def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "unknown"


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """The ``config.json`` of an export: every key of LLaDA's file, values from ``config``.

    Keys are sorted like LLaDA's file. ``dtype``, when given, is recorded as ``torch_dtype``.
    ``bos_token_id`` is not a key of LLaDA's config.json; it goes to generation_config.json.
    """
    values = dict(ARCHITECTURE_FLAGS)
    values.update(FIXED_KEYS)
    values.update({key: getattr(config, key) for key in CONFIG_FIELDS})
    values["rope_theta"] = float(config.rope_theta)
    values["transformers_version"] = transformers_version()
    if dtype is not None:
        values["torch_dtype"] = str(dtype).removeprefix("torch.")
    return dict(sorted(values.items()))


def config_from_hf(
    hf_config: dict, generation_config: dict | None = None, source: str = CONFIG_FILE
) -> ModelConfig:
    """A ``ModelConfig`` from LLaDA's ``config.json`` (and optionally ``generation_config.json``).

    Rejects configs of another architecture (biases, tied embeddings, ALiBi, LayerNorm, ...) with
    one line naming the key. Keys LLaDA's code treats as optional take its defaults:
    ``n_kv_heads`` null -> ``n_heads``, ``embedding_size`` null -> ``vocab_size``,
    ``mlp_hidden_size`` null -> ``mlp_ratio * d_model``. Unknown extra keys are ignored.
    """
    model_type = hf_config.get("model_type")
    if model_type != "llada":
        raise ValueError(f"{source}: model_type is {model_type!r}, expected 'llada' (LLaDA's format)")
    for key, want in ARCHITECTURE_FLAGS.items():
        if key in hf_config and hf_config[key] != want:
            raise ValueError(
                f"{source}: {key}={json.dumps(hf_config[key])} is not LLaDA's architecture "
                f"(difftron implements {key}={json.dumps(want)})"
            )
    if hf_config.get("multi_query_attention"):
        raise ValueError(f"{source}: multi_query_attention=true is not supported (use n_kv_heads)")
    required = ("d_model", "n_layers", "n_heads", "vocab_size")
    missing = [key for key in required if hf_config.get(key) is None]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
    values = {key: hf_config[key] for key in CONFIG_FIELDS if hf_config.get(key) is not None}
    values.setdefault("n_kv_heads", hf_config["n_heads"])
    values.setdefault("embedding_size", hf_config["vocab_size"])
    if "mlp_hidden_size" not in values:
        values["mlp_hidden_size"] = int(hf_config.get("mlp_ratio", 4)) * int(hf_config["d_model"])
    bos = hf_config.get("bos_token_id")
    if bos is None and generation_config:
        bos = generation_config.get("bos_token_id")
    if bos is not None:
        values["bos_token_id"] = bos
    for key in ("eos_token_id", "pad_token_id", "mask_token_id"):
        if key not in values and generation_config and generation_config.get(key) is not None:
            values[key] = generation_config[key]
    try:
        return ModelConfig.from_dict(values)  # checks each value's type (d_model "128" is a string)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


# ----- reading HF directories -------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}), got a {type(value).__name__}")
    return value


@contextmanager
def open_safetensors(path: Path):
    """``safe_open`` with one line naming the file when it is truncated or not safetensors."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as err:  # safetensors' SafetensorError, OSError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({first}); it is damaged or truncated") from None
    with handle as f:
        yield f


def read_hf_config(hf_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF directory (config.json plus generation_config.json if present)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF model folder not found: {hf_dir}")
    config_file = hf_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE} (not a Hugging Face model folder)")
    generation_file = hf_dir / GENERATION_CONFIG_FILE
    generation = read_json(generation_file) if generation_file.is_file() else None
    return config_from_hf(read_json(config_file), generation, source=str(config_file))


def hf_weight_files(hf_dir: str | os.PathLike) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (via the index, or model.safetensors).

    Raises FileNotFoundError naming a shard the index lists but the folder lacks.
    """
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        bad = next((shard for shard in weight_map.values() if not isinstance(shard, str)
                    or (hf_dir / shard).resolve().parent != hf_dir.resolve()), None)
        if bad is not None:
            raise ValueError(f"{index}: shard {bad!r} is not a file of {hf_dir} (the index must name files in its own folder)")
        files = {name: hf_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{index}: shard {shard.name} is listed but missing from {hf_dir}")
        return files
    single = hf_dir / SINGLE_WEIGHTS_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{hf_dir}: no {INDEX_FILE} or {SINGLE_WEIGHTS_FILE}")


def hf_tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from safetensors headers only (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"{path}: the index lists {name} in this shard but it is not there")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def iter_hf_tensors(
    files: dict[str, Path], names: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` one at a time, opening each shard once, in ``names`` order
    grouped by shard (default: every name in ``files``)."""
    order = list(files) if names is None else list(names)
    by_file: dict[Path, list[str]] = {}
    for name in order:
        by_file.setdefault(files[name], []).append(name)
    for path, shard_names in by_file.items():
        with open_safetensors(path) as f:
            for name in shard_names:
                yield name, f.get_tensor(name)


def load_hf_dir(
    hf_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict in our names) of a LLaDA-format HF folder.

    Names and shapes are checked against config.json before any tensor data is read.
    ``dtype`` converts every tensor (default: keep the stored dtype).
    """
    config = read_hf_config(hf_dir)
    files = hf_weight_files(hf_dir)
    expected = expected_hf_tensors(config)
    check_tensors(expected, hf_tensor_shapes(files), source=str(hf_dir))
    state = {}
    for name, tensor in iter_hf_tensors(files, expected):
        state[from_hf_name(name)] = tensor if dtype is None else tensor.to(dtype)
    return config, state


def remote_code_files() -> list[Path]:
    """The project's ``configuration_llada.py`` and ``modeling_llada.py`` (copied into exports)."""
    return [REMOTE_CODE_DIR / name for name in REMOTE_CODE_FILES]


SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def write_special_tokens_map(hf_dir: str | os.PathLike, mask_token_id: int | None = None) -> Path | None:
    """Write ``special_tokens_map.json`` (as LLaDA's HF repos ship it) from the tokenizer files in
    ``hf_dir``: its named special tokens, plus the mask token (``mask_token_id``) under
    ``additional_special_tokens`` when the tokenizer does not name it (LLaDA-8B-Base lists
    ``<|mdm_mask|>`` there). A file already present (copied from the tokenizer) is kept; returns
    the path written, or None."""
    hf_dir = Path(hf_dir)
    path = hf_dir / SPECIAL_TOKENS_MAP_FILE
    if path.exists() or not (hf_dir / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # the tokenizer files alone: AutoTokenizer would read the export's config.json, whose auto_map
    # names remote code, and ask on the terminal whether to run it
    if (hf_dir / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir), local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True, trust_remote_code=False)
    out: dict = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = getattr(tok, key, None)
        if value is not None:
            out[key] = str(value)
    extra = [str(t) for t in getattr(tok, "additional_special_tokens", None) or []]
    if mask_token_id is not None:
        mask = tok.convert_ids_to_tokens(int(mask_token_id))
        if mask is not None and mask not in out.values() and mask not in extra:
            extra.append(mask)
    if extra:
        out["additional_special_tokens"] = extra
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return path
