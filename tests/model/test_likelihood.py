"""LLaDA's Monte-Carlo likelihood estimator: unbiased vs exact enumeration, batching, CFG, fixed noise."""

import pytest
import torch

from model.likelihood import (
    exact_loglikelihood,
    fixed_noise_bound,
    loglikelihood_rolling,
    mc_loglikelihood,
    rolling_windows,
    standard_error,
    stratified_mask_counts,
)
from model.objective import draw_noise, forward_process, masked_token_losses, row_weights, weighted_loss
from model.llada import build_model
from tests.tiny import tiny_model_config


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model_config(
        d_model=32, mlp_hidden_size=64, vocab_size=50, embedding_size=64, max_sequence_length=64,
        init_std=0.5,  # a peaked model: masks matter
    )
    return build_model(cfg, seed=0).eval()


def test_stratified_counts_are_uniform_over_k():
    length, num = 5, 3
    hist = torch.zeros(num, length + 1)
    for k in range(1, length + 1):
        counts = stratified_mask_counts(k, length, num)
        assert counts.min() >= 1 and counts.max() <= length
        for j, c in enumerate(counts.tolist()):
            hist[j, c] += 1
    assert (hist[:, 1:] == 1).all()  # each sample's count is uniform on {1..L}


@pytest.mark.parametrize("prompt,cont,cfg_scale", [([5, 6, 7], [8, 9, 10, 11], 0.0), ([3], [40, 41, 42], 0.0), ([5, 6], [7, 8, 9], 1.0)])
def test_estimator_is_unbiased(model, prompt, cont, cfg_scale):
    exact = exact_loglikelihood(model, prompt, cont, cfg_scale=cfg_scale)
    runs = [mc_loglikelihood(model, [(prompt, cont)], mc_num=4, cfg_scale=cfg_scale, seed=s)[0] for s in range(300)]
    mean, se = sum(runs) / len(runs), standard_error(runs)
    assert se > 0
    assert abs(mean - exact) < 3 * se, (mean, exact, se)


def test_estimator_concentrates_with_mc_num(model):
    exact = exact_loglikelihood(model, [5, 6, 7], [8, 9, 10, 11])
    est = mc_loglikelihood(model, [([5, 6, 7], [8, 9, 10, 11])], mc_num=512, seed=0)[0]
    assert abs(est - exact) < 0.05 * abs(exact)


def test_single_token_continuation_is_exact(model):
    exact = exact_loglikelihood(model, [5, 6], [9])
    assert mc_loglikelihood(model, [([5, 6], [9])], mc_num=1)[0] == pytest.approx(exact, abs=1e-5)
    # and equals log softmax of the masked position directly: over every logit by default
    # (LLaDA's), over the real vocabulary (the first 50 of 64) with restrict_vocab
    logits = model(torch.tensor([[5, 6, 2]]))[0, 2]
    assert exact == pytest.approx(torch.log_softmax(logits, -1)[9].item(), abs=1e-5)
    restricted = exact_loglikelihood(model, [5, 6], [9], restrict_vocab=True)
    assert restricted == pytest.approx(torch.log_softmax(logits[:50], -1)[9].item(), abs=1e-5)
    assert mc_loglikelihood(model, [([5, 6], [9])], mc_num=1, restrict_vocab=True)[0] == pytest.approx(restricted, abs=1e-5)


def test_estimate_independent_of_batching_and_neighbours(model):
    reqs = [([5, 6, 7], [8, 9, 10]), ([3], [40, 41]), ([11, 12, 13, 14, 15], [16])]
    together, samples = mc_loglikelihood(model, reqs, mc_num=8, batch_size=5, seed=4, return_samples=True)
    assert [len(s) for s in samples] == [8, 8, 8]
    alone = [mc_loglikelihood(model, [r], mc_num=8, batch_size=64, seed=4)[0] for r in reqs]
    assert together == pytest.approx(alone, abs=1e-4)
    assert mc_loglikelihood(model, reqs[:1], mc_num=8, seed=5)[0] != pytest.approx(alone[0], abs=1e-6)


def test_empty_continuation_raises(model):
    with pytest.raises(ValueError, match="continuation is empty"):
        mc_loglikelihood(model, [([5], [])])


def test_rolling_windows_cover_each_token_once():
    toks = list(range(10, 33))
    windows = rolling_windows(toks, prefix_id=0, max_length=8)
    assert windows[0][0] == [0]
    assert sum((w[1] for w in windows), []) == toks
    for ctx, cont in windows:
        assert len(ctx) + len(cont) <= 8 and ctx
    for (ctx, _cont), (_, prev) in zip(windows[1:], windows):
        assert ctx[-1] == prev[-1]  # the context is the text right before


def test_loglikelihood_rolling_is_sum_of_windows(model):
    toks = list(range(10, 30))
    total = loglikelihood_rolling(model, toks, max_length=8, mc_num=4, seed=1)
    parts = mc_loglikelihood(model, rolling_windows(toks, 0, 8), mc_num=4, seed=1)
    assert total == pytest.approx(sum(parts)) and total < 0


def test_fixed_noise_bound_is_repeatable_and_equals_pretraining_loss(model):
    ids = torch.randint(3, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    a = fixed_noise_bound(model, ids, seed=11)
    b = fixed_noise_bound(model, ids, seed=11)
    assert a.shape == (4,) and torch.equal(a, b)
    assert not torch.equal(a, fixed_noise_bound(model, ids, seed=12))
    # a row's value depends only on (seed, its index), not on the other rows
    assert fixed_noise_bound(model, ids[2:3], seed=11, sample_index=torch.tensor([2]))[0] == pytest.approx(a[2].item())
    # and matches the pretraining loss on the same masks
    noise = draw_noise(11, 0, torch.arange(4), 16, global_batch_size=2**62, stratified=False)
    noisy, masked = forward_process(ids, noise, 2)
    with torch.no_grad():
        loss = weighted_loss(masked_token_losses(model(noisy), ids, masked, noise.p_mask), row_weights(4, 16, 4))
    assert a.mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_llada_batches_per_request_and_fresh_k_per_mini_batch(model):
    """``llada_batches``: each mini-batch of a request draws its own k (LLaDA's rule), requests
    are not packed together, and the estimate is still close to the exact bound."""
    from model.likelihood import _sample_rows, llada_mask_counts

    rows = _sample_rows(0, [5, 6, 7], [8, 9, 10, 11, 12], 12, seed=3, group=4)
    counts = [len(r.masked) for r in rows]
    for b in range(0, 12, 4):
        assert counts[b : b + 4] == llada_mask_counts(counts[b], 5, 4).tolist()
    reqs = [([5, 6, 7], [8, 9, 10, 11]), ([3], [40, 41])]
    together = mc_loglikelihood(model, reqs, mc_num=8, batch_size=4, seed=1, llada_batches=True)
    alone = [mc_loglikelihood(model, [r], mc_num=8, batch_size=4, seed=1, llada_batches=True)[0] for r in reqs]
    assert together == pytest.approx(alone, abs=1e-5)
    exact = exact_loglikelihood(model, *reqs[0])
    est = mc_loglikelihood(model, reqs[:1], mc_num=512, batch_size=32, seed=0, llada_batches=True)[0]
    assert abs(est - exact) < 0.05 * abs(exact)
