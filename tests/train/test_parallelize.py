"""Single-process checks of the helpers behind train.parallelize: the config and shard helpers (no
process groups), and the seams by which the parallel layers reuse ``model.llada``'s block and head
and ``model.objective``'s loss (a world of one process, megatron's groups at TP=1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.llada import build_model
from model.config import ModelConfig
from tests.train.test_distributed import world_of_one  # noqa: F401 (a fixture, used by tp1_world)
from train.layout import ParallelConfig, ParallelLayout
from train.parallelize import NO_CLIP, deepspeed_config, drawn_full_tensor, full_shape, shard_of
from tests.tiny import splittable_config


def tiny_model() -> ModelConfig:
    return splittable_config()


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


# ----- the parallel layers are model.llada's block and head, the loss is model.objective's --------
@pytest.fixture
def tp1_world(request):
    from megatron.core import parallel_state as ps

    request.getfixturevalue("world_of_one")  # a gloo world of one process (test_distributed's fixture)

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    yield


def _layer_options(config: ModelConfig, checkpointing: str = "none"):
    from train.parallelize import LayerOptions

    return LayerOptions(model=config, tp=1, sequence_parallel=False, activation_checkpointing=checkpointing,
                        attention_backend="sdpa", use_cpu_initialization=True)


def _copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():
        for (n_dst, p_dst), (n_src, p_src) in zip(dst.named_parameters(), src.named_parameters(), strict=True):
            assert n_dst == n_src  # the single-device names, in the same order
            p_dst.copy_(p_src)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_parallel_block_at_tp1_is_the_llada_block_in_s_b_d(tp1_world, mode):
    """TransformerLayer = LLaDABlock with megatron's linears and [s, b, d]: at TP=1 its output and
    gradients equal the single-device block's (run in [s, b, d]) bit for bit, in every
    checkpointing mode, and equal the [b, s, d] block's to rounding."""
    from model.llada import LLaDABlock
    from train.parallelize import TransformerLayer

    config = tiny_model()
    torch.manual_seed(0)
    reference = LLaDABlock(config, sequence_first=True)
    reference.attention_backend, reference.checkpointing = "sdpa", mode
    layer = TransformerLayer(_layer_options(config, mode), 0)
    _copy_weights(layer, reference)
    assert [n for n, _ in layer.full_named_parameters()][0] == "transformer.blocks.0.attn_norm.weight"
    x = torch.randn(16, 3, config.d_model)  # [s, b, d]
    outs, grads = [], []
    for block in (reference, layer):
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    batch_first = LLaDABlock(config)
    batch_first.attention_backend = "sdpa"
    _copy_weights(batch_first, reference)
    with torch.no_grad():
        torch.testing.assert_close(batch_first(x.transpose(0, 1)).transpose(0, 1), outs[0], rtol=1e-5, atol=1e-6)


def test_parallel_head_and_loss_at_tp1_are_the_models(tp1_world):
    """HeadLayer = model.llada.lm_head with a column-parallel projection; MaskedDiffusionLoss =
    model.objective.masked_token_losses with megatron's vocab-parallel CE in place of F.cross_entropy,
    weighted by the same row weights."""
    from model.llada import build_model
    from model.objective import masked_token_losses, row_weights, weighted_loss
    from train.parallelize import HeadLayer, MaskedDiffusionLoss

    config = tiny_model()
    model = build_model(config, seed=1)
    head = HeadLayer(_layer_options(config))
    with torch.no_grad():
        head.ln_f.weight.copy_(torch.rand(config.d_model) + 0.5)
        model.transformer.ln_f.weight.copy_(head.ln_f.weight)
        head.ff_out.weight.copy_(model.transformer.ff_out.weight)
    b, s = 3, 16
    x = torch.randn(b, s, config.d_model)
    logits = model.head(x)
    assert torch.equal(head(x.transpose(0, 1)).transpose(0, 1), logits)
    targets = torch.randint(0, 125, (b, s), generator=torch.Generator().manual_seed(2))
    masked = torch.rand(b, s, generator=torch.Generator().manual_seed(3)) < 0.5
    p_mask = torch.tensor([0.3, 0.6, 0.9])
    weights = row_weights(8, s, b)
    plain = masked_token_losses(logits, targets, masked, p_mask)
    loss = MaskedDiffusionLoss()
    parallel = loss(logits.transpose(0, 1), (targets, masked, p_mask, weights))
    torch.testing.assert_close(loss.rows[0], plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parallel, weighted_loss(plain, weights), rtol=1e-6, atol=1e-7)
    # and the reference formula: F.cross_entropy at the masked positions / p_mask, / (G·L)
    ce = F.cross_entropy(logits[masked], targets[masked], reduction="none") / p_mask[:, None].expand(b, s)[masked]
    torch.testing.assert_close(parallel, ce.sum() / (8 * s), rtol=1e-6, atol=1e-7)


def test_the_optimizer_is_the_local_engines(tp1_world):
    """parallelize hands DeepSpeed the AdamW that LocalEngine uses (decay on matrices only)."""
    from train.parallelize import parallelize

    layout = ParallelLayout.from_config(ParallelConfig(), 1, tiny_model(), 2, 2)
    pm = parallelize(tiny_model(), layout, seed=0, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                     grad_clip=1.0)
    adamw = pm.engine.optimizer
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["foreach"] is True
    decays = {p.ndim >= 2: g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert decays == {True: 0.1, False: 0.0}
