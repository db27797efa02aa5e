"""train/local_engine.py: the single-process engine. (Its numbers are also the reference side of
the parity suite, tests/train/test_parallel_engine.py.)"""

from __future__ import annotations

import copy

import torch

from model.objective import Objective, masked_token_losses, weighted_loss
from tests.tiny import tiny_model, tiny_model_config
from train.engine import MicroBatch
from train.local_engine import LocalEngine

G, L = 4, 16


def _engine(model) -> LocalEngine:
    return LocalEngine(copy.deepcopy(model), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                       grad_clip=1.0, precision="fp32", device=torch.device("cpu"))


def _prepared():
    objective = Objective(sft=False, seq_len=L, global_batch_size=G, mask_token_id=tiny_model_config().mask_token_id)
    ids = torch.randint(3, 256, (G, L), generator=torch.Generator().manual_seed(0))
    return objective.prepare({"input_ids": ids, "sample_index": torch.arange(G)}, seed=0, step=0, length=L)


def _split(p, size: int) -> list[MicroBatch]:
    return [MicroBatch(p.noisy[i:i + size], p.targets[i:i + size], p.masked[i:i + size], p.p_mask[i:i + size],
                       p.row_weight[i:i + size]) for i in range(0, G, size)]


def test_accumulating_micro_batches_is_one_step_on_the_whole_batch():
    model, p = tiny_model(seed=1), _prepared()
    whole, halves, quarters = _engine(model), _engine(model), _engine(model)
    outs = [e.train_step(_split(p, size), lr=1e-2) for e, size in ((whole, 4), (halves, 2), (quarters, 1))]
    # the loss is the model's masked-diffusion loss of the whole batch (model.objective's functions)
    with torch.no_grad():
        expected = weighted_loss(masked_token_losses(model(p.noisy), p.targets, p.masked, p.p_mask), p.row_weight)
    for out in outs:
        torch.testing.assert_close(out.loss, float(expected), rtol=1e-6, atol=0)
        torch.testing.assert_close(out.grad_norm, outs[0].grad_norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.per_sample, outs[0].per_sample, rtol=1e-6, atol=0)
    # the accumulated (clipped) gradients agree: AdamW's first moment after one step is 0.1 * grad
    # (the weights themselves move by ~lr·sign(grad), which rounding can flip where grad ~ 0)
    for e in (halves, quarters):
        for (name, a), b in zip(whole.model.named_parameters(), e.model.parameters()):
            ga, gb = whole.optimizer.state[a]["exp_avg"], e.optimizer.state[b]["exp_avg"]
            torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5 * float(ga.abs().max()), msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), whole.model.parameters()))


class _Veto:
    def row_stats(self, rows, weights):
        return torch.zeros(3, 1, dtype=torch.float64)

    def decide(self, loss, grad_norm, stats):
        self.seen = (loss, grad_norm)
        return "spike"


def test_a_vetoed_step_changes_no_weight_and_no_adamw_state():
    engine, p = _engine(tiny_model(seed=2)), _prepared()
    engine.train_step(_split(p, 2), lr=1e-2)  # one applied step: AdamW state exists
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    moments = copy.deepcopy(engine.optimizer.state_dict())
    gate = _Veto()
    out = engine.train_step(_split(p, 2), lr=1e-2, gate=gate)
    assert out.skipped and out.skip_reason == "spike" and gate.seen == (out.loss, out.grad_norm)
    assert all(torch.equal(weights[k], v) for k, v in engine.model.state_dict().items())
    after = engine.optimizer.state_dict()
    assert [int(s["step"]) for s in after["state"].values()] == [int(s["step"]) for s in moments["state"].values()] == [1] * len(after["state"])
    assert all(torch.equal(after["state"][i]["exp_avg"], moments["state"][i]["exp_avg"]) for i in after["state"])
    assert all(p.grad is None for p in engine.model.parameters())
