"""Single-process checks of the helpers behind train.parallelize (no process groups)."""

from __future__ import annotations

import torch

from model.llada import build_model
from model.config import ModelConfig
from train.layout import ParallelConfig, ParallelLayout
from train.parallelize import NO_CLIP, deepspeed_config, drawn_full_tensor, full_shape, shard_of


def tiny_model() -> ModelConfig:
    return ModelConfig(
        d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=128,
        embedding_size=128, max_sequence_length=32, mask_token_id=127, eos_token_id=126,
        pad_token_id=126, bos_token_id=125,
    )


def test_drawn_full_tensors_equal_build_model_weights():
    config = tiny_model()
    reference = build_model(config, seed=7).state_dict()
    draw = drawn_full_tensor(config, seed=7)
    for name, tensor in reference.items():
        assert torch.equal(draw(name, tensor.shape), tensor), name


def test_shards_cut_along_partition_dim_and_reassemble():
    full = torch.arange(24.0).view(4, 6)
    p = torch.nn.Parameter(torch.empty(4, 3))
    p.tensor_model_parallel, p.partition_dim = True, 1
    assert full_shape(p, 2) == torch.Size([4, 6])
    parts = [shard_of(full, p, 2, r) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    replicated = torch.nn.Parameter(torch.empty(4, 6))
    assert shard_of(full, replicated, 2, 1) is full


def test_deepspeed_config_matches_layout():
    lay = ParallelLayout.from_config(ParallelConfig(pp=2, zero_stage=1), 4, tiny_model(), 2, 16)
    cfg = deepspeed_config(lay, grad_clip=0.0, precision="bf16")
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == NO_CLIP  # norms are still computed, never clipped
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 1
    assert cfg["pipeline"]["pipe_partitioned"] is False
