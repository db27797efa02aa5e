"""Run under torchrun (gloo): every rank loads its slice; rank 0 writes the union of each step.

Usage: python -m torch.distributed.run --nproc_per_node=N tests/data/multirank_worker.py SHARDS OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from data.config import DataConfig, SourceConfig
from data.loader import build_loader

STEPS, GBS, SEQ = 6, 8, 16


def make_loader(shards: str, rank: int = 0, world: int = 1, split: str = "train"):
    cfg = DataConfig(sources=[SourceConfig(path=str(shards))], validation_fraction=0.05)
    return build_loader(cfg, seq_len=SEQ, global_batch_size=GBS, dp_rank=rank, dp_size=world, seed=11, split=split)


def main(shards: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def make(split="train"):
        return make_loader(shards, rank, world, split)

    loader = make()
    steps = []
    for step in range(STEPS):
        b = loader.batch(step)
        assert b["input_ids"].shape == (GBS // world, SEQ)
        expected = list(range(step * GBS + rank * GBS // world, step * GBS + (rank + 1) * GBS // world))
        assert b["sample_index"].tolist() == expected, (rank, step)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"index": b["sample_index"].tolist(), "ids": b["input_ids"].tolist()})
        rows = sorted((i, r) for g in gathered for i, r in zip(g["index"], g["ids"]))
        steps.append([r for _, r in rows])
        if step == 2:
            state = json.loads(json.dumps(loader.state_dict()))
    # resume from the state saved after step 2: a fresh loader reproduces steps 3.. exactly
    resumed = make()
    resumed.load_state_dict(state)
    fresh = make()
    for step in range(3, STEPS):
        assert torch.equal(resumed.next_batch()["input_ids"], fresh.batch(step)["input_ids"]), (rank, step)
    val = make("validation").batch(0)["input_ids"]
    gathered = [None] * world
    dist.all_gather_object(gathered, val.tolist())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "steps": steps, "validation": [r for g in gathered for r in g], "resume_ok": True}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
