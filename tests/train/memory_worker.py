"""torchrun worker: bytes per parameter that each DeepSpeed path of the real engine holds
(launched by tests/tools/test_plan_calibration.py).

    python -m torch.distributed.run --standalone --nproc_per_node=N memory_worker.py OUT.json CASE [CASE ...]

A case is ``z{Z}_{fp32|bf16}[_pp{P}]`` (tp 1, dp = N / P). For each of two model sizes the worker
builds the engine with ``build_parallel_engine``, trains one step, and at the veto point of the
second step (gradients reduced, the AdamW update not yet applied)
and after each of its micro-batches (the largest of these is the peak of the model states: the
gradients accumulated over micro-batches are alive then), adds up the bytes of every distinct
tensor storage alive in the process (found through the
garbage collector: parameters, gradients, DeepSpeed's flat buffers and partitions, AdamW state),
less what was alive before the engine was built.
The slope between the two sizes, divided by the parameters this rank's stage holds, is the
path's bytes per parameter; whatever does not grow with the model (buckets, the data) falls
into the intercept. Rank 0 writes ``{case: {"bytes_per_param": max over ranks, ...}}``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.objective import draw_noise, forward_process  # noqa: E402
from train.engine import MicroBatch  # noqa: E402

G, L, MBS = 8, 16, 1  # gradient accumulation over >= 2 micro-batches at dp <= 4
# matrices above DeepSpeed's ZeRO-3 persistence threshold (1e5 elements), so they are partitioned
SIZES = {
    "small": dict(d_model=384, n_layers=2, n_heads=6, n_kv_heads=6, mlp_hidden_size=1024),
    "large": dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536),
}


def model_config(size: str) -> ModelConfig:
    return ModelConfig(
        **SIZES[size], vocab_size=512, embedding_size=512, max_sequence_length=32, mask_token_id=511,
        eos_token_id=510, pad_token_id=510, bos_token_id=509,
    )


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage of a tensor reachable by the garbage collector."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # some objects refuse isinstance/attribute access
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def micro_batches(config: ModelConfig, dp_rank: int, dp: int, step: int) -> list[MicroBatch]:
    tokens = torch.randint(0, 500, (G, L), generator=torch.Generator().manual_seed(step))
    noise = draw_noise(0, step, torch.arange(G) + step * G, L, G)
    noisy, masked = forward_process(tokens, noise, config.mask_token_id)
    rows = slice(dp_rank * G // dp, (dp_rank + 1) * G // dp)
    mb = MicroBatch(noisy[rows], tokens[rows], masked[rows], noise.p_mask[rows], torch.full((G // dp,), 1.0 / (G * L)))
    n = mb.input_ids.shape[0]
    return [MicroBatch(*(x[i:i + MBS] for x in (mb.input_ids, mb.targets, mb.masked, mb.p_mask, mb.row_weight)))
            for i in range(0, n, MBS)]


class MeasuringGate:
    """A step gate that lets every step through and measures the live tensors when asked."""

    def __init__(self) -> None:
        self.bytes = None

    def row_stats(self, per_row, row_weight):
        return torch.zeros(3, 1, dtype=torch.float64)

    def decide(self, loss, grad_norm, stats):
        self.bytes = live_tensor_bytes()
        return None


def measure(case: str, size: str, world: int) -> tuple[int, int, str]:
    """(live bytes at the veto point, parameters of this rank's stage, DeepSpeed optimizer class)."""
    from train.layout import ParallelConfig
    from train.parallel_engine import build_parallel_engine

    m = re.fullmatch(r"z(\d)_(fp32|bf16)(?:_pp(\d))?", case)
    zero, precision, pp = int(m.group(1)), m.group(2), int(m.group(3) or 1)
    config = model_config(size)
    before = live_tensor_bytes()  # what earlier cases left behind does not count
    engine = build_parallel_engine(
        config, ParallelConfig(pp=pp, zero_stage=zero), world_size=world, seed=0, lr=1e-3, weight_decay=0.1,
        betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, precision=precision, micro_batch_size=MBS, global_batch_size=G,
    )
    try:
        params = sum(
            int(torch.Size(getattr(p, "ds_shape", p.shape)).numel())
            for layer in engine.pm.layers for _, p in layer.full_named_parameters()
        )
        engine.train_step(micro_batches(config, engine.dp_rank, engine.dp_size, 0), 1e-3)
        # also after every micro-batch (without a pipeline): gradient accumulation buffers that the
        # optimizer step frees (e.g. fp32 accumulation of bf16 gradients) peak there, not at the veto
        after_micro_batch, ds_step = [0], engine.engine.step

        def step(*args, **kwargs):
            out = ds_step(*args, **kwargs)
            after_micro_batch[0] = max(after_micro_batch[0], live_tensor_bytes())
            return out

        engine.engine.step = step
        if pp > 1:  # the pipeline schedule steps once; sample after each micro-batch's backward
            from deepspeed.runtime.pipe.schedule import BackwardPass

            table = dict(type(engine.engine)._INSTRUCTION_MAP)
            ds_backward = table[BackwardPass]

            def backward(self, *args, **kwargs):
                out = ds_backward(self, *args, **kwargs)
                after_micro_batch[0] = max(after_micro_batch[0], live_tensor_bytes())
                return out

            table[BackwardPass] = backward
            engine.engine._INSTRUCTION_MAP = table  # the instance's copy; the schedule looks it up there
        gate = MeasuringGate()
        engine.train_step(micro_batches(config, engine.dp_rank, engine.dp_size, 1), 1e-3, gate=gate)
        return max(gate.bytes, after_micro_batch[0]) - before, params, type(engine.engine.optimizer).__name__
    finally:
        engine.close()
        del engine
        gc.collect()


def main() -> None:
    warnings.filterwarnings("ignore")
    out, cases = sys.argv[1], sys.argv[2:]
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for case in cases:
        try:
            (b1, p1, opt), (b2, p2, _) = measure(case, "small", world), measure(case, "large", world)
            mine = torch.tensor([(b2 - b1) / (p2 - p1), b1 - (b2 - b1) / (p2 - p1) * p1], dtype=torch.float64)
            parts = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            results[case] = {
                "bytes_per_param": max(float(p[0]) for p in parts),
                "per_rank": [round(float(p[0]), 3) for p in parts],
                "intercept_mb": max(float(p[1]) for p in parts) / 1e6,
                "optimizer": opt,
            }
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results[case] = {"error": f"{type(e).__name__}: {e}"}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
