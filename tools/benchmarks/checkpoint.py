"""``python -m tools.bench checkpoint``: checkpoint save/load and HF export/import speed.

Builds a model of a few hundred MB (fp32), then times, each on the same weights:

- ``save``: ``train.checkpoint.save_checkpoint`` (model.safetensors, no optimizer state);
- ``load``: ``train.checkpoint.load_model_weights``, then a copy of every tensor into RAM
  (safetensors memory-maps the file, so without the copy nothing would be read yet);
- ``export_fp32`` / ``export_bf16``: ``tools.convert_to_hf`` (streamed, sharded);
- ``import``: ``tools.convert_from_hf`` of the bf16 export (streamed into fp32).

Prints one line per operation: seconds and GB/s of fp32 model bytes (the bytes the operation
reads or writes may differ, e.g. bf16 exports write half). Options size the model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from model.config import ModelConfig


def bench_config(args) -> ModelConfig:
    return ModelConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.d_model // 64, n_kv_heads=args.d_model // 64,
        mlp_hidden_size=args.mlp_hidden_size, vocab_size=args.vocab_size, embedding_size=args.vocab_size,
        max_sequence_length=2048, mask_token_id=2, eos_token_id=1, pad_token_id=1, bos_token_id=0,
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--mlp-hidden-size", type=int, default=2816)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--max-shard-size", default="100MB", help="export shard size (default 100MB)")
    parser.add_argument("--workdir", default=None, help="folder for the files (default: a temporary folder)")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from model.llada import build_model
    from tools.convert_from_hf import convert_hf_dir
    from tools.convert_to_hf import convert_checkpoint
    from train.checkpoint import load_model_weights, save_checkpoint

    config = bench_config(args)
    state = build_model(config, seed=0).state_dict()
    gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    print(f"model: {config.num_params() / 1e6:.1f}M parameters, {gb:.3f} GB fp32 "
          f"(d_model={config.d_model}, n_layers={config.n_layers}, vocab={config.vocab_size})")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        run = work / "run"
        config_yaml = OmegaConf.to_yaml(OmegaConf.create({"model": config.to_dict()}))
        results = {
            "save": timed(lambda: save_checkpoint(run, 1, model_state=state, optimizer_state=None, trainer_state={},
                                                  config_yaml=config_yaml, tokenizer_dir=None)),
            "load": timed(lambda: {k: v.clone() for k, v in load_model_weights(run)[1].items()}),
            "export_fp32": timed(lambda: convert_checkpoint(run, work / "hf32", dtype="fp32",
                                                            max_shard_size=args.max_shard_size)),
            "export_bf16": timed(lambda: convert_checkpoint(run, work / "hf16", dtype="bf16",
                                                            max_shard_size=args.max_shard_size)),
            "import": timed(lambda: convert_hf_dir(work / "hf16", work / "imported")),
        }
    for name, seconds in results.items():
        print(f"{name:12s} {seconds:8.2f} s  {gb / seconds:6.2f} GB/s")
    return 0
