"""ParallelLayout validation and rank arithmetic (no processes)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from model.config import ModelConfig
from train.layout import ParallelConfig, ParallelLayout
from tests.tiny import splittable_config


def model(**overrides) -> ModelConfig:
    return splittable_config(**overrides)


def layout(world=8, mbs=2, gbs=16, cfg=None, **parallel) -> ParallelLayout:
    return ParallelLayout.from_config(ParallelConfig(**parallel), world, cfg or model(), mbs, gbs)


def test_valid_layout_fields():
    lay = layout(world=8, tp=2, pp=2, zero_stage=1)
    assert (lay.tp, lay.pp, lay.dp, lay.zero_stage) == (2, 2, 2, 1)
    assert lay.grad_accum_steps == 16 // (2 * 2)
    assert lay.stage_blocks == [2, 2]
    assert not lay.is_trivial
    assert layout(world=1).is_trivial


def test_stage_boundaries_put_embedding_first_and_head_last():
    assert layout(world=2, pp=2).stage_boundaries() == [0, 3, 6]  # [emb,b0,b1] [b2,b3,head]
    assert layout(world=2, pp=2, pp_split=[1, 3]).stage_boundaries() == [0, 2, 6]
    assert layout(world=1).stage_boundaries() == [0, 6]


def test_coordinates_follow_megatron_tp_dp_pp_order():
    lay = layout(world=8, tp=2, pp=2)
    coords = [lay.coordinates(r) for r in range(8)]
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert coords[5] == (1, 0, 1)


def test_parallel_config_is_omegaconf_compatible():
    cfg = OmegaConf.merge(OmegaConf.structured(ParallelConfig), {"tp": 2, "pp_split": [1, 3]})
    assert OmegaConf.to_object(cfg) == ParallelConfig(tp=2, pp_split=[1, 3])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world=6, tp=4), "world size 6 is not a multiple of parallel.tp × parallel.pp"),
        (dict(world=8, tp=8), "must divide the model's n_heads (4)"),
        (dict(world=4, tp=4, cfg=model(n_kv_heads=2)), "must divide the model's n_kv_heads (2)"),
        (dict(world=2, tp=2, cfg=model(embedding_size=129)), "must divide the model's embedding_size (129)"),
        (dict(world=3, pp=3), "parallel.pp (3) does not divide n_layers (4)"),
        (dict(world=2, pp=2, pp_split=[1, 2]), "parallel.pp_split [1, 2] must list 2 positive block counts"),
        (dict(world=2, pp=2, pp_split=[0, 4]), "parallel.pp_split [0, 4]"),
        (dict(world=2, pp=2, zero_stage=2), "parallel.zero_stage=2 cannot combine with pipeline"),
        (dict(world=2, pp=2, zero_stage=3), "parallel.zero_stage=3 cannot combine with pipeline"),
        (dict(world=4, gbs=12, mbs=4), "global batch 12 is not divisible by micro_batch_size × dp"),
        (dict(world=1, zero_stage=4), "parallel.zero_stage must be 0, 1, 2 or 3"),
        (dict(world=2, pp=2, pp_schedule="interleaved"), "interleaved"),
        (dict(world=2, pp=2, virtual_stages=2), "virtual_stages"),
        (dict(world=2, pp_schedule="gpipe"), "parallel.pp_schedule must be one of"),
        (dict(world=2, sequence_parallel=True), "sequence_parallel=true needs parallel.tp > 1"),
        (dict(world=2, tp=0), "must be >= 1"),
    ],
)
def test_impossible_layouts_fail_with_one_clear_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        layout(**kwargs)
    text = str(err.value)
    assert text.startswith("parallel config: ") and "\n" not in text
    assert message in text, text


def test_kv_heads_checked_separately():
    cfg = model(n_heads=8, n_kv_heads=2, d_model=64)
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\)"):
        layout(world=4, tp=4, cfg=cfg)


def test_zero_stages_with_pp1_are_all_allowed():
    for stage in range(4):
        assert layout(world=2, zero_stage=stage).dp == 2
