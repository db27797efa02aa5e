import math

import pytest
import torch
import torch.nn.functional as F

from model.llada import build_model
from model.objective import (
    Noise,
    draw_noise,
    forward_process,
    masked_logits,
    masked_token_losses,
    random_length,
    row_weights,
    time_from_uniform,
    weighted_loss,
)
from tests.conftest import tiny_model_config

MASK = 2


def test_loss_equals_direct_transcription_of_llada_formula():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), seed=0)
    b, seq_len, eps = 3, 20, 1e-3
    input_ids = torch.randint(3, 256, (b, seq_len))
    t = torch.rand(b)
    r = torch.rand(b, seq_len)
    # --- LLaDA GUIDELINES.md, transcribed ---
    p_mask = (1 - eps) * t + eps
    p_mask = p_mask[:, None].repeat(1, seq_len)
    masked_indices = r < p_mask
    noisy_batch = torch.where(masked_indices, MASK, input_ids)
    logits = model(noisy_batch)
    token_loss = F.cross_entropy(logits[masked_indices], input_ids[masked_indices], reduction="none") / p_mask[masked_indices]
    reference = token_loss.sum() / (input_ids.shape[0] * input_ids.shape[1])
    # --- ours ---
    noise = Noise(t=t, p_mask=time_from_uniform(t, eps), uniforms=r)
    noisy, masked = forward_process(input_ids, noise, MASK)
    assert torch.equal(noisy, noisy_batch)
    per_sample = masked_token_losses(model(noisy), input_ids, masked, noise.p_mask)
    ours = weighted_loss(per_sample, row_weights(b, seq_len, b))
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    # what training runs (train.local_engine): the head at the masked positions only
    gathered = masked_logits(model, noisy, masked)
    assert gathered.shape == (int(masked.sum()), model.config.embedding_size)
    head_only_at_masked = weighted_loss(masked_token_losses(gathered, input_ids, masked, noise.p_mask), row_weights(b, seq_len, b))
    torch.testing.assert_close(head_only_at_masked, reference, atol=1e-6, rtol=1e-6)
    # and its gradients are those of the full head's loss
    model.zero_grad()
    reference.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    head_only_at_masked.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], atol=1e-6, rtol=1e-5, msg=n)


def test_masked_fraction_follows_t():
    noise = draw_noise(seed=7, step=3, sample_index=torch.arange(64), seq_len=4000, global_batch_size=64)
    _, masked = forward_process(torch.full((64, 4000), 5), noise, MASK)
    frac = masked.float().mean(1)
    p = noise.p_mask
    z = (frac - p) / torch.sqrt(p * (1 - p) / 4000 + 1e-12)
    assert z.abs().max() < 5, z.abs().max()
    # and t really spans (0, 1): the mean masked fraction is about one half
    assert abs(frac.mean().item() - 0.5) < 0.1


def test_sft_prompt_is_never_masked():
    ids = torch.randint(3, 256, (4, 30))
    prompt_lengths = torch.tensor([0, 5, 12, 29])
    t = torch.ones(4)  # t = 1: everything that can be masked is masked
    noise = Noise(t=t, p_mask=time_from_uniform(t), uniforms=torch.rand(4, 30) * 0.999)
    noisy, masked = forward_process(ids, noise, MASK, prompt_lengths)
    for row, n in enumerate(prompt_lengths.tolist()):
        assert not masked[row, :n].any()
        assert torch.equal(noisy[row, :n], ids[row, :n])
        assert masked[row, n:].all()


def test_sft_loss_normalizes_by_answer_length():
    per_sample = torch.tensor([6.0, 10.0])
    prompt_lengths = torch.tensor([4, 8])
    # answer lengths 6 and 2 at seq_len 10: (6/6 + 10/2) / 2 = 3
    assert weighted_loss(per_sample, row_weights(2, 10, 2, prompt_lengths)).item() == 3.0


def test_noise_is_identical_for_the_same_global_samples_in_any_order_or_split():
    whole = draw_noise(seed=1, step=5, sample_index=torch.arange(40, 48), seq_len=32, global_batch_size=8)
    # two data-parallel ranks, and a shuffled order
    first = draw_noise(seed=1, step=5, sample_index=torch.arange(40, 44), seq_len=32, global_batch_size=8)
    second = draw_noise(seed=1, step=5, sample_index=torch.arange(44, 48), seq_len=32, global_batch_size=8)
    order = torch.tensor([3, 7, 0, 5])
    shuffled = draw_noise(seed=1, step=5, sample_index=40 + order, seq_len=32, global_batch_size=8)
    assert torch.equal(torch.cat([first.uniforms, second.uniforms]), whole.uniforms)
    assert torch.equal(torch.cat([first.t, second.t]), whole.t)
    assert torch.equal(shuffled.uniforms, whole.uniforms[order])
    assert torch.equal(shuffled.t, whole.t[order])
    # another step or seed draws other noise
    other = draw_noise(seed=1, step=6, sample_index=torch.arange(48, 56), seq_len=32, global_batch_size=8)
    assert not torch.equal(other.uniforms, whole.uniforms)


def test_unkeyed_noise_depends_on_the_split():
    whole = draw_noise(seed=1, step=5, sample_index=torch.arange(8), seq_len=16, global_batch_size=8, keyed=False)
    half = draw_noise(seed=1, step=5, sample_index=torch.arange(4, 8), seq_len=16, global_batch_size=8, keyed=False)
    assert not torch.equal(half.uniforms, whole.uniforms[4:])


def test_stratified_t_covers_every_stratum():
    g = 32
    for step in range(5):
        noise = draw_noise(seed=3, step=step, sample_index=torch.arange(step * g, (step + 1) * g), seq_len=4, global_batch_size=g)
        strata = torch.floor(noise.t * g).long()
        assert sorted(strata.tolist()) == list(range(g))
    # each position's t is still uniform over (0, 1) across steps
    ts = torch.stack([
        draw_noise(seed=3, step=s, sample_index=torch.tensor([s * g]), seq_len=1, global_batch_size=g).t
        for s in range(400)
    ]).flatten()
    assert abs(ts.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 400)
    unstrat = draw_noise(seed=3, step=0, sample_index=torch.arange(g), seq_len=4, global_batch_size=g, stratified=False)
    assert len(set(torch.floor(unstrat.t * g).long().tolist())) < g  # i.i.d. t leaves gaps


def test_random_length_rate_and_range():
    lengths = [random_length(seed=0, step=s, seq_len=64, probability=0.1) for s in range(4000)]
    short = [n for n in lengths if n != 64]
    rate = len(short) / 4000
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 4000)
    assert min(short) >= 1 and max(short) <= 64
    assert random_length(seed=0, step=0, seq_len=64, probability=0.0) == 64
    # deterministic per (seed, step): every rank agrees
    assert lengths == [random_length(seed=0, step=s, seq_len=64, probability=0.1) for s in range(4000)]


def test_row_weights_pretraining_and_sft():
    # pretraining: 1/(G·L) for every row; SFT: 1/(G·answer length), answer length >= 1
    assert torch.equal(row_weights(8, 16, 3), torch.full((3,), 1.0 / 128))
    sft = row_weights(4, 10, 3, torch.tensor([4, 8, 10]))
    assert sft.dtype == torch.float32
    assert torch.equal(sft, torch.tensor([1 / 24, 1 / 8, 1 / 4], dtype=torch.float64).float())


def test_objective_is_chosen_once_and_prepares_batches():
    from model.objective import Objective

    g, s = 4, 12
    ids = torch.randint(3, 100, (g, s), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "sample_index": torch.arange(g), "prompt_lengths": torch.tensor([2, 3, 4, 5]),
             "pad_length": torch.tensor(7)}
    pre = Objective(sft=False, seq_len=s, global_batch_size=g, mask_token_id=MASK, random_length_prob=0.0)
    sft = Objective(sft=True, seq_len=s, global_batch_size=g, mask_token_id=MASK, length_multiple=2)
    assert pre.step_length(batch, seed=0, step=3) == s and pre.judge_spikes(s) and not pre.judge_spikes(s - 1)
    assert sft.step_length(batch, seed=0, step=3) == 8  # pad length 7 rounded up to the multiple 2
    assert sft.judge_spikes(8)
    p = pre.prepare(batch, seed=5, step=1, length=s)
    noise = draw_noise(5, 1, torch.arange(g), s, g)
    assert torch.equal(p.noisy, forward_process(ids, noise, MASK)[0]) and torch.equal(p.t, noise.t)
    assert torch.equal(p.row_weight, row_weights(g, s, g))
    q = sft.prepare(batch, seed=5, step=1, length=8)
    assert q.noisy.shape == (g, 8) and not q.masked[3, :5].any()
    assert torch.equal(q.row_weight, row_weights(g, 8, g, batch["prompt_lengths"]))
    with pytest.raises(ValueError, match="needs SFT shards"):
        sft.check_batch({"input_ids": ids, "sample_index": torch.arange(g)})


def test_one_t_bucket_helper_for_metrics_and_guard():
    import train.guards as guards
    from model.objective import bucket_row_stats, t_bucket_index

    assert guards.t_bucket_index is t_bucket_index and guards.bucket_row_stats is bucket_row_stats
    t = torch.tensor([0.0, 0.9166666269302368, 0.5, 1.0])  # fp32 t·12 rounds up to 11.0; in fp64 it is bucket 10
    assert t_bucket_index(t, 12).tolist() == [0, 10, 6, 11]
    stats = bucket_row_stats(t_bucket_index(t, 2), torch.tensor([1.0, 2.0, 3.0, 4.0]), 2)
    assert stats.tolist() == [[1, 3], [1, 9], [1, 29]]  # count, Σx, Σx² per bucket
