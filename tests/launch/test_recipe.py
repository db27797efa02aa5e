"""configs/llada_8b_pretrain.yaml: the LLaDA recipe parses (placeholder data paths need not
exist) and holds LLaDA's numbers; the planner reads it."""

import pytest

from tests.launch.conftest import REPO

RECIPE = REPO / "configs" / "llada_8b_pretrain.yaml"


def test_recipe_values():
    from train.config import load_config

    cfg = load_config(RECIPE, check_paths=False)
    t = cfg.train
    assert cfg.model.num_params() == 8_015_581_184
    assert (t.seq_len, t.global_batch_size) == (4096, 1280)
    assert (t.lr, t.warmup_steps, t.drop_lr, t.final_lr, t.weight_decay) == (4e-4, 2000, 1e-4, 1e-5, 0.1)
    tokens_per_step = 1280 * 4096
    assert t.max_steps * tokens_per_step == pytest.approx(2.3e12, rel=1e-5)
    assert t.drop_step * tokens_per_step == pytest.approx(1.2e12, rel=1e-5)
    assert t.decay_steps * tokens_per_step == pytest.approx(0.3e12, rel=1e-4)
    assert (t.precision, t.attention_backend, t.random_length_prob) == ("bf16", "auto", 0.01)
    assert t.resume is True


def test_recipe_schedule_shape():
    from train.config import load_config
    from train.schedule import wsd_lr

    t = load_config(RECIPE, check_paths=False).train
    kw = dict(lr=t.lr, max_steps=t.max_steps, warmup_steps=t.warmup_steps, drop_step=t.drop_step,
              drop_lr=t.drop_lr, decay_steps=t.decay_steps, final_lr=t.final_lr)
    assert wsd_lr(1999, **kw) == pytest.approx(4e-4)
    assert wsd_lr(100_000, **kw) == pytest.approx(4e-4)
    assert wsd_lr(t.drop_step, **kw) == pytest.approx(1e-4)
    assert wsd_lr(t.max_steps - 1, **kw) == pytest.approx(1e-5)


def test_planner_reads_recipe(capsys):
    from tools.plan import main

    assert main([str(RECIPE), "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "8,015,581,184" in out and "global batch 1280 sequences of 4096 tokens" in out
    # TP1 PP1 ZeRO-1 needs 85 GB at dp 64 (7 + 12/dp bytes/param): TP1 PP2 comes first
    assert "parallel.tp=1 parallel.pp=2 parallel.zero_stage=1" in out


@pytest.mark.parametrize("gpus, tp", [(8, 2), (64, 2), (512, 2), (2048, 8)])
def test_recipe_layouts_fit_80gb_under_the_calibrated_planner(gpus, tp):
    """The layouts the recipe documents (its defaults: TP2 + SP, ZeRO-1; TP8 at 2048 GPUs) fit an
    80 GB H100 with the planner's calibrated memory model, and the planner lists them."""
    from tools.plan import GB, GIB, enumerate_layouts, layout_memory
    from train.config import load_config
    from train.layout import ParallelLayout

    cfg = load_config(RECIPE, [f"parallel.tp={tp}"], check_paths=False)
    t, p = cfg.train, cfg.parallel
    layout = ParallelLayout.from_config(p, gpus, cfg.model, t.micro_batch_size, t.global_batch_size)
    assert p.sequence_parallel and t.seq_len % tp == 0
    _, total = layout_memory(cfg.model, tp=layout.tp, pp=layout.pp, dp=layout.dp, zero_stage=layout.zero_stage,
                             seq_len=t.seq_len, micro_batch=t.micro_batch_size, grad_accum=layout.grad_accum_steps,
                             checkpointing=t.activation_checkpointing, reserve_bytes=4 * GB)
    assert total < 0.9 * 80 * GIB
    listed = enumerate_layouts(cfg.model, gpus=gpus, seq_len=t.seq_len, global_batch=t.global_batch_size,
                               capacity_bytes=80 * GIB)
    assert any((lay.tp, lay.pp, lay.zero_stage, lay.checkpointing) == (tp, 1, 1, "none") for lay in listed)
