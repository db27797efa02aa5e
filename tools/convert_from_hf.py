"""Turn a LLaDA-format Hugging Face folder into a difftron training checkpoint.

    python -m tools.convert_from_hf HF_DIR OUT [--step 0] [--dtype fp32|bf16] [--force]

HF_DIR is a local folder in LLaDA's format (e.g. GSAI-ML/LLaDA-8B-Base downloaded with
``huggingface-cli download``, or an export of ``tools.convert_to_hf``): ``config.json``, safetensors
weights (sharded with ``model.safetensors.index.json``, or one ``model.safetensors``) and tokenizer
files. OUT becomes a run folder::

    OUT/checkpoints/step_00000000/   a training checkpoint (``train.checkpoint``'s format) with
        dcp/ + manifest.json        the full weights in our names (fp32 unless --dtype), no
                                    optimizer state
        config.yaml                 a ``model:`` section with the ModelConfig fields
        state.json                  {"step": 0, "converted_from": HF_DIR}
        tokenizer/                  the HF tokenizer files
    OUT/checkpoints/latest          "step_00000000"

Use it with ``train.init_from=OUT`` for continued pretraining or SFT. Names and shapes are checked
against config.json before anything is written; tensors stream one at a time into the output
(each is read from its HF shard when the checkpoint writer reaches it: memory stays near the
largest tensor). OUT is built in a temporary sibling folder and
renamed into place; an existing OUT is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from model.config import ModelConfig
from model.hf import (
    DTYPES,
    check_tensors,
    expected_hf_tensors,
    from_hf_name,
    hf_tensor_shapes,
    hf_weight_files,
    iter_hf_tensors,
    read_hf_config,
)
from tools.convert_to_hf import copy_tokenizer_files, prepare_output, publish
from train.checkpoint import MODEL_PREFIX, Chunk, Sharded, checkpoint_path, save_checkpoint

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def convert_hf_dir(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int = 0,
    dtype: str = "fp32",
    force: bool = False,
) -> Path:
    """``python -m tools.convert_from_hf`` as a function. Returns the checkpoint folder."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if step < 0:
        raise ValueError(f"--step must be >= 0, got {step}")
    hf_dir, out = Path(hf_dir), Path(out)
    config: ModelConfig = read_hf_config(hf_dir)
    files = hf_weight_files(hf_dir)
    expected = expected_hf_tensors(config)
    check_tensors(expected, hf_tensor_shapes(files), source=str(hf_dir))

    tmp = prepare_output(out, force)
    try:
        target = DTYPES[dtype]

        def lazy(hf_name: str):  # read when the writer reaches it: one tensor in memory at a time
            return lambda: next(iter_hf_tensors(files, [hf_name]))[1].to(target)

        state = {
            MODEL_PREFIX + from_hf_name(name): Sharded(tuple(shape), target, [Chunk((0,) * len(shape), tuple(shape), lazy(name))])
            for name, shape in expected.items()
        }
        config_yaml = OmegaConf.to_yaml(OmegaConf.create({"model": config.to_dict()}))
        staging = tmp / ".tokenizer"
        has_tokenizer = bool(copy_tokenizer_files(hf_dir, staging, TOKENIZER_FILES))
        if not has_tokenizer:
            print(f"warning: {hf_dir} has no tokenizer files; the checkpoint has no tokenizer/", file=sys.stderr)
        save_checkpoint(tmp, step, state=state, trainer_state={"converted_from": str(hf_dir.resolve())},
                        config_yaml=config_yaml, tokenizer_dir=staging if has_tokenizer else None, keep_last=0, rng=False)
        shutil.rmtree(staging, ignore_errors=True)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint_path(out, step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_from_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="local Hugging Face folder in LLaDA's format")
    parser.add_argument("out", help="output run folder (must not exist unless --force)")
    parser.add_argument("--step", type=int, default=0, help="step number of the checkpoint (default 0)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="stored dtype (default fp32)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        ckpt = convert_hf_dir(args.hf_dir, args.out, step=args.step, dtype=args.dtype, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {ckpt} (use train.init_from={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
