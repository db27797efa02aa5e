"""torchrun worker for tests/train/test_checkpoint_memory.py: per-rank memory and bytes read
of a checkpoint save, an async save and a resume (``train.checkpoint``), measured from /proc.

    python -m torch.distributed.run --standalone --nproc_per_node=4 checkpoint_memory_worker.py OUT.json LAYOUT

LAYOUT is ``tp{T}_pp{P}_z{Z}``. Each rank builds the engine, takes one step, then measures:
``share`` (bytes of the chunks it owns: fp32 weights and both AdamW moments), the growth of its
peak RSS (``VmHWM`` after the operation, reset through ``/proc/self/clear_refs`` just before,
minus ``VmRSS`` before) during a save, an async save (staging + background write) and, in a
freshly built engine, a resume; and the bytes it read during the resume (``rchar`` of
``/proc/self/io``). Rank 0 writes ``{"ranks": [per-rank dicts]}``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import torch.distributed as dist  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from parity_worker import MBS, OPT, split, step_batch  # noqa: E402

G = 8


def model_config() -> ModelConfig:
    """About 25 M parameters: the whole training state (fp32 weights + 2 moments) is ~295 MB."""
    return ModelConfig(
        d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536, vocab_size=4096,
        embedding_size=4096, max_sequence_length=32, mask_token_id=127, eos_token_id=126,
        pad_token_id=126, bos_token_id=125,
    )


def status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def rchar() -> int:
    return int(re.search(r"rchar:\s+(\d+)", open("/proc/self/io").read()).group(1))


def measure(fn) -> tuple[int, int]:
    """(peak RSS growth, bytes read) of ``fn()`` in this process."""
    gc.collect()
    before, read0 = status("VmRSS"), rchar()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    fn()
    return status("VmHWM") - before, rchar() - read0


def build(layout: str):
    from train.layout import ParallelConfig
    from train.parallel_engine import build_parallel_engine

    m = re.fullmatch(r"tp(\d)_pp(\d)_z(\d)", layout)
    return build_parallel_engine(
        model_config(), ParallelConfig(tp=int(m[1]), pp=int(m[2]), zero_stage=int(m[3])),
        world_size=dist.get_world_size(), seed=3, lr=1e-3, precision="fp32", micro_batch_size=MBS,
        global_batch_size=G, **OPT,
    )


def share_bytes(state: dict) -> int:
    from train.checkpoint import Sharded

    return sum(c.get().numel() * c.get().element_size() for v in state.values() if isinstance(v, Sharded) for c in v.chunks)


def main() -> int:
    out_path, layout = sys.argv[1], sys.argv[2]
    warnings.filterwarnings("ignore")
    from train.checkpoint import AsyncSave, checkpoint_group, load_into_engine, save_checkpoint
    from train.distributed import init_distributed

    init_distributed(use_cuda=False)
    import torch.distributed.checkpoint  # noqa: F401  (imports are not the checkpoint's reads)

    checkpoint_group()
    folder = os.path.join(os.path.dirname(os.path.abspath(out_path)), "ckpt")
    engine = build(layout)
    per_dp = G // engine.dp_size
    rows = range(engine.dp_rank * per_dp, (engine.dp_rank + 1) * per_dp)
    engine.train_step(split(step_batch(0, model_config()), rows, MBS), 1e-3)
    share = share_bytes(engine.checkpoint_state())
    kwargs = dict(trainer_state={}, config_yaml="", tokenizer_dir=None, keep_last=0, rng=False)
    save_growth, _ = measure(lambda: save_checkpoint(folder, 1, state=engine.checkpoint_state(), **kwargs))
    async_growth, _ = measure(lambda: AsyncSave(folder, 2, engine.checkpoint_state(), **kwargs).wait())
    engine.close()
    engine = None  # the lambdas above are done with it
    fresh = build(layout)
    ckpt = os.path.join(folder, "checkpoints", "step_00000001")
    from pathlib import Path

    load_growth, read = measure(lambda: load_into_engine(Path(ckpt), fresh))
    result = {"share": share, "save_growth": save_growth, "async_growth": async_growth,
              "load_growth": load_growth, "load_read": read}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump({"ranks": gathered}, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    fresh.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
