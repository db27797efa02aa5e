"""Export a training checkpoint as a Hugging Face model folder in LLaDA's format.

    python -m tools.convert_to_hf CKPT OUT [--dtype bf16|fp32] [--max-shard-size 5GB] [--force]
        [--steps 128] [--gen-length 128] [--block-length 128] [--remasking low_confidence]

CKPT is a run folder (its ``checkpoints/latest`` is used), a ``checkpoints`` folder or one
``step_XXXXXXXX`` folder. OUT receives ``config.json`` (LLaDA's keys), the project's
``configuration_llada.py`` and ``modeling_llada.py``, safetensors shards named
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, the checkpoint's
tokenizer files and ``generation_config.json`` (special ids, mask id, sampler defaults). It loads
with ``transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True)``.

The converter is built around a *tensor source*: an object with ``config``, ``tokenizer_dir``,
``tensor_shapes()`` (our name -> shape, read without loading data) and ``iter_tensors(names)``
(yields ``(our_name, full_tensor)`` one at a time). ``CheckpointSource`` reads the single-file
``model.safetensors`` of a checkpoint; a reader that merges TP/PP shards can provide the same four
members. Tensors stream through ``ShardWriter``, so memory stays near one output shard.
OUT is written into a temporary sibling folder and renamed into place when complete; an existing
OUT is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.hf import (
    CONFIG_FILE,
    DTYPES,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    check_tensors,
    config_to_hf,
    expected_hf_tensors,
    from_hf_name,
    remote_code_files,
    to_hf_name,
    transformers_version,
    write_special_tokens_map,
)
from model.sampling import REMASKING, GenerationConfig

@dataclass
class SamplerDefaults:
    """LLaDA ``generate()`` defaults recorded in generation_config.json: those of
    ``model.sampling.GenerationConfig``, checked by it."""

    steps: int = GenerationConfig.steps
    gen_length: int = GenerationConfig.gen_length
    block_length: int = GenerationConfig.block_length
    remasking: str = GenerationConfig.remasking
    cfg_scale: float = GenerationConfig.cfg_scale

    def __post_init__(self) -> None:
        GenerationConfig(
            steps=self.steps, gen_length=self.gen_length, block_length=self.block_length,
            remasking=self.remasking, cfg_scale=self.cfg_scale,
        ).validate()


# ----- tensor sources -----------------------------------------------------------------------------
class CheckpointSource:
    """Tensors of a training checkpoint of any layout (``train.checkpoint``): each full tensor is
    assembled from the chunks every rank wrote, one tensor at a time, every chunk's CRC-32
    checked as it is read; a damaged checkpoint is refused with one line."""

    def __init__(self, path: str | os.PathLike) -> None:
        from train.checkpoint import checked_checkpoint, read_model_config, tokenizer_dir_of

        self.ckpt = checked_checkpoint(path)
        self.weights = self.ckpt
        self.config: ModelConfig = read_model_config(self.ckpt)
        self.tokenizer_dir: Path | None = tokenizer_dir_of(self.ckpt)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        from train.checkpoint import stored_tensors

        return {name: shape for name, (shape, _) in stored_tensors(self.ckpt).items()}

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from train.checkpoint import iter_model_tensors

        yield from iter_model_tensors(self.ckpt, names)


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``"1000"`` -> 1000 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"--max-shard-size: cannot parse {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
    powers = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    size = int(number * powers[unit])
    if size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return size


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (a larger single tensor
    gets a shard of its own), then names them ``model-0000i-of-0000n.safetensors`` and writes the
    index with ``metadata.total_size``. Holds at most one shard in memory."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f".shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Flush, rename the shards and write the index. Returns the number of shards."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f".shard-{i:05d}.tmp", self.folder / final)
            os.chmod(self.folder / final, 0o644)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return n


def generation_config(config: ModelConfig, sampler: SamplerDefaults) -> dict:
    """generation_config.json: LLaDA's special ids plus the mask id and sampler defaults."""
    return {
        "_from_model_config": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "mask_token_id": config.mask_token_id,
        **asdict(sampler),
        "transformers_version": transformers_version(),
    }


# transformers 5 saves fast tokenizers as "TokenizersBackend", a class 4.x does not know; both
# versions load a tokenizer.json-backed tokenizer declared as "PreTrainedTokenizerFast" (LLaDA's).
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def copy_tokenizer_files(tokenizer_dir: Path, dest: Path, names: Iterable[str] | None = None) -> list[str]:
    """Copy the tokenizer files (all files of ``tokenizer_dir``, or only those in ``names``) into
    ``dest`` (made if anything is copied); returns the copied names. ``tokenizer_config.json``'s
    ``tokenizer_class`` is made portable across transformers 4.x and 5.x (see
    PORTABLE_TOKENIZER_CLASSES), everything else is verbatim."""
    wanted = None if names is None else set(names)
    items = [i for i in sorted(tokenizer_dir.iterdir()) if i.is_file() and (wanted is None or i.name in wanted)]
    if items:
        dest.mkdir(parents=True, exist_ok=True)
    for item in items:
        if item.name == "tokenizer_config.json" and (tokenizer_dir / "tokenizer.json").is_file():
            settings = json.loads(item.read_text())
            portable = PORTABLE_TOKENIZER_CLASSES.get(settings.get("tokenizer_class"))
            if portable is not None:
                settings["tokenizer_class"] = portable
                (dest / item.name).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
                continue
        shutil.copyfile(item, dest / item.name)
    return [item.name for item in items]


def prepare_output(out: Path, force: bool) -> Path:
    """Check OUT and return a fresh temporary sibling folder to write into."""
    if out.exists() and not force:
        raise FileExistsError(f"output folder exists: {out} (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path exists and is not a folder: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder to OUT (replacing an old OUT, which --force allowed)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_hf_dir(
    source,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 10**9,
    sampler: SamplerDefaults | None = None,
    force: bool = False,
) -> Path:
    """Write the HF folder of a tensor source (see the module docstring). Returns OUT.

    Names and shapes are checked against ``source.config`` before anything is written.
    """
    out = Path(out)
    config: ModelConfig = source.config
    expected = expected_hf_tensors(config)
    found = {to_hf_name(name): shape for name, shape in source.tensor_shapes().items()}
    check_tensors(expected, found, source=str(getattr(source, "weights", "checkpoint")))
    tmp = prepare_output(out, force)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        our_names = [from_hf_name(name) for name in expected]
        for name, tensor in source.iter_tensors(our_names):
            writer.add(to_hf_name(name), tensor.to(dtype))
            del tensor
        writer.finish()
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
        gen = generation_config(config, sampler or SamplerDefaults())
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")
        for code in remote_code_files():
            shutil.copyfile(code, tmp / code.name)
        if source.tokenizer_dir is not None:
            copy_tokenizer_files(Path(source.tokenizer_dir), tmp)
            write_special_tokens_map(tmp, config.mask_token_id)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    sampler: SamplerDefaults | None = None,
    force: bool = False,
) -> Path:
    """``python -m tools.convert_to_hf`` as a function. Returns OUT."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = CheckpointSource(ckpt)
    if source.tokenizer_dir is None:
        print(f"warning: {source.ckpt} has no tokenizer/ folder; the export will have no tokenizer files",
              file=sys.stderr)
    return write_hf_dir(source, out, dtype=DTYPES[dtype], max_shard_bytes=parse_size(max_shard_size),
                        sampler=sampler, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_to_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="run folder, checkpoints folder or step_XXXXXXXX folder")
    parser.add_argument("out", help="output folder (must not exist unless --force)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="stored dtype (default bf16, like LLaDA-8B)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    defaults = SamplerDefaults()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="sampler default: denoising steps")
    parser.add_argument("--gen-length", type=int, default=defaults.gen_length, help="sampler default: answer length")
    parser.add_argument("--block-length", type=int, default=defaults.block_length, help="sampler default: block length")
    parser.add_argument("--remasking", default=defaults.remasking, choices=REMASKING, help="sampler default: remasking")
    args = parser.parse_args(argv)
    try:
        sampler = SamplerDefaults(steps=args.steps, gen_length=args.gen_length,
                                  block_length=args.block_length, remasking=args.remasking)
        out = convert_checkpoint(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                 sampler=sampler, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    index = json.loads((out / INDEX_FILE).read_text())
    shards = len(set(index["weight_map"].values()))
    size = index["metadata"]["total_size"] / 1e9
    print(f"wrote {out}: {len(index['weight_map'])} tensors, {shards} shard(s), {size:.3f} GB, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
