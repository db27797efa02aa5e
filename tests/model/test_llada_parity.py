"""Parity with LLaDA's own code: our sampler and greedy check against LLaDA's algorithms rewritten
in ``tests/model/llada_reference.py``, on the same tiny model (token-identical at temperature 0),
plus targeted cases for each fine point (issue #19 items 3, 4 and 6)."""

import pytest
import torch

from model.config import ModelConfig
from model.llada import build_model
from model.sampling import generate
from tests.model import llada_reference as ref
from tests.tiny import tiny_model_config

BOS, EOS, MASK, EOT = 0, 1, 2, 3
VOCAB, EMBED = 40, 48  # ids 40..47 are embedding padding rows


def tiny_config(**kw) -> ModelConfig:
    values = dict(d_model=32, mlp_hidden_size=64, vocab_size=VOCAB, embedding_size=EMBED, mask_token_id=MASK,
                  eos_token_id=EOS, pad_token_id=EOS, bos_token_id=BOS, init_std=0.3)
    return tiny_model_config(**{**values, **kw})


PROMPTS = [[BOS, 5, 6, 7], [BOS, 8, 9, 10, 11, 12, 13], [BOS, 20], [BOS, 30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def model():
    """A random tiny model whose EOS, EoT, mask and one padding row copy (with a small
    perturbation) the head rows of its most frequent argmax tokens, so that every flag matters."""
    m = build_model(tiny_config(), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        outs = torch.tensor([t for p in PROMPTS for t in generate(m, [p], gen_length=8, steps=8, block_length=8)[0]])
        top = torch.bincount(outs, minlength=EMBED)
        top[[EOS, MASK, EOT, BOS]] = -1
        frequent = top.argsort(descending=True)[:4].tolist()
        w = m.transformer.ff_out.weight
        for dst, src in zip([EOS, EOT, MASK, VOCAB + 3], frequent):
            w[dst] = w[src] + 0.05 * torch.randn(w.shape[1], generator=g)
    return m


GRID = [
    dict(block_length=bl, steps=st, cfg_scale=cfg, logits_eos_inf=lei, confidence_eos_eot_inf=cei)
    for bl, st in [(8, 8), (4, 4)]
    for cfg in [0.0, 1.5]
    for lei in [False, True]
    for cei in [False, True]
]


def ours(model, prompt, **kw):
    out = generate(model, [prompt], gen_length=8, eot_id=EOT, seed=0, **kw)
    return out[0, len(prompt):].tolist()


def theirs(model, prompt, **kw):
    return ref.sampler(model, prompt, gen_length=8, mask_id=MASK, eos_id=EOS, eot_id=EOT, **kw)


@pytest.mark.parametrize("opts", GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sampler_token_identical_at_temperature_0(model, opts):
    for prompt in PROMPTS:
        assert ours(model, prompt, **opts) == theirs(model, prompt, **opts), prompt


def test_the_grid_exercises_every_flag(model):
    """Not vacuous: the flags change outputs, and the default commits what LLaDA commits (EOS,
    EoT, the mask token, padding rows)."""
    outs = {i: [ours(model, p, **o) for p in PROMPTS] for i, o in enumerate(GRID)}
    flat = [t for gens in outs.values() for g in gens for t in g]
    assert {EOS, EOT, MASK} <= set(flat) and max(flat) >= VOCAB
    for key in ("logits_eos_inf", "confidence_eos_eot_inf", "cfg_scale"):
        pairs = [(i, j) for i, a in enumerate(GRID) for j, b in enumerate(GRID)
                 if a[key] != b[key] and all(a[k] == b[k] for k in a if k != key)]
        assert any(outs[i] != outs[j] for i, j in pairs), key


@pytest.mark.parametrize("opts", [GRID[0], GRID[-1], GRID[5]])
def test_sampler_token_identical_in_bf16(model, opts):
    m = build_model(tiny_config(), seed=0).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16)
    for prompt in PROMPTS:
        assert ours(m, prompt, **opts) == theirs(m, prompt, **opts), prompt


class FixedLogits(torch.nn.Module):
    """Logits from a table by absolute position (batch 1, no padding), in ``dtype``."""

    def __init__(self, table: torch.Tensor, vocab: int = 16):
        super().__init__()
        self.config = tiny_config(vocab_size=vocab, embedding_size=vocab)
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, position_ids=None):
        return self.table[: ids.shape[1]][None].expand(ids.shape[0], -1, -1).clone()


def first_commits_ours(model, prompt, **kw):
    seen = []
    generate(model, [prompt], eot_id=EOT, seed=0, callback=lambda b, s, x: seen.append(x[0].clone()), **kw)
    x = seen[0]
    return sorted((j, int(x[j])) for j in range(len(prompt), x.shape[0]) if x[j] != MASK)


def first_commits_theirs(model, prompt, **kw):
    seen = []
    ref.sampler(model, prompt, mask_id=MASK, eos_id=EOS, eot_id=EOT, first_commits=seen, **kw)
    return seen[0]


def table(rows: dict, length: int = 6, vocab: int = 16, dtype=torch.float32) -> torch.Tensor:
    t = torch.zeros(length, vocab)
    for pos, logits in rows.items():
        for token, value in logits.items():
            t[pos, token] = value
    return t.to(dtype)


def test_confidence_eos_eot_inf_renormalizes_at_temperature_0():
    # position 2 picks 9 but shares its mass with EOS; position 3 picks 9 more confidently. LLaDA
    # removes EOS before the softmax, so position 2 then wins (0.80 > 0.69): item 3
    m = FixedLogits(table({2: {9: 4.0, EOS: 3.9}, 3: {9: 3.5}, 4: {EOS: 6.0}, 5: {7: 1.0}}))
    kw = dict(gen_length=4, steps=4, block_length=4, confidence_eos_eot_inf=True)
    assert first_commits_ours(m, [BOS, 5], **kw) == first_commits_theirs(m, [BOS, 5], **kw) == [(2, 9)]


def test_confidence_eos_eot_inf_keeps_eos_at_positive_temperature():
    # at T > 0 LLaDA only removes EoT from the softmax: a near-certain EOS pick keeps confidence ~1
    # (margins large enough that the picks are certain at T = 0.5, confidences distinct in fp32)
    m = FixedLogits(table({2: {EOS: 12.0}, 3: {9: 8.0}, 4: {EOT: 10.0}, 5: {7: 6.0}}))
    kw = dict(gen_length=4, steps=4, block_length=4, temperature=0.5, confidence_eos_eot_inf=True)
    assert first_commits_ours(m, [BOS, 5], **kw) == first_commits_theirs(m, [BOS, 5], **kw) == [(2, EOS)]


def test_confidence_eos_eot_inf_changes_nothing_under_random_remasking():
    m = FixedLogits(table({2: {EOS: 5.0}, 3: {9: 5.0}, 4: {EOT: 5.0}, 5: {7: 5.0}}))
    for seed in range(8):
        kw = dict(gen_length=4, steps=4, block_length=4, remasking="random", seed=seed, eot_id=EOT)
        plain, flagged = [], []
        generate(m, [[BOS, 5]], callback=lambda b, s, x, out=plain: out.append(x[0].tolist()), **kw)
        generate(m, [[BOS, 5]], confidence_eos_eot_inf=True, callback=lambda b, s, x, out=flagged: out.append(x[0].tolist()), **kw)
        assert plain == flagged, seed


def test_confidence_eos_eot_zero_option_commits_stops_last():
    m = FixedLogits(table({2: {EOS: 12.0}, 3: {9: 8.0}, 4: {EOT: 10.0}, 5: {7: 6.0}}))
    for temperature, remasking in [(0.0, "low_confidence"), (0.5, "low_confidence"), (0.0, "random")]:
        seen = []
        generate(m, [[BOS, 5]], gen_length=4, steps=4, block_length=4, temperature=temperature, remasking=remasking,
                 eot_id=EOT, seed=0, confidence_eos_eot_zero=True, callback=lambda b, s, x, out=seen: out.append(x[0].tolist()))
        assert seen[1][2] == MASK and seen[1][4] == MASK  # EOS and EoT come in the last two steps


@pytest.mark.parametrize("order", [(4.0, 4.0625), (4.0625, 4.0)])
def test_exact_ties_break_like_llada(order):
    # two positions whose confidences differ in float64 but are equal in bf16 (item 6): LLaDA's
    # bf16 softmax + top-k over the whole row decides, not the float64 value
    rows = {2: {9: 8.0 + order[0] - 4.0}, 3: {10: 8.0 + order[1] - 4.0}, 4: {11: 2.0}, 5: {12: 1.0}}
    m = FixedLogits(table(rows, dtype=torch.bfloat16))
    p = torch.softmax(m.table[2:4].float().double(), -1).max(-1).values
    assert p[0] != p[1] and torch.softmax(m.table[2:4], -1).max(-1).values.unique().numel() == 1
    kw = dict(gen_length=4, steps=4, block_length=4)
    assert first_commits_ours(m, [BOS, 5], **kw) == first_commits_theirs(m, [BOS, 5], **kw)
    with_fp64 = first_commits_ours(m, [BOS, 5], confidence_fp64=True, **kw)
    assert with_fp64 == ([(3, 10)] if order[1] > order[0] else [(2, 9)])  # the option: float64 decides


def test_a_committed_mask_stays_eligible_like_llada():
    # position 2 "commits" the mask token first (LLaDA's argmax covers it); it is filled later,
    # in the second block; restrict_vocab never samples it
    m = FixedLogits(table({2: {MASK: 9.0, 9: 8.0}, 3: {10: 5.0}, 4: {11: 4.0}, 5: {12: 3.0}}))
    kw = dict(gen_length=4, steps=4, block_length=2)
    out = generate(m, [[BOS, 5]], eot_id=EOT, seed=0, **kw)[0, 2:].tolist()
    assert out == ref.sampler(m, [BOS, 5], mask_id=MASK, eos_id=EOS, eot_id=EOT, **kw)
    assert MASK not in generate(m, [[BOS, 5]], seed=0, restrict_vocab=True, **kw)[0].tolist()


def greedy_targets(model, cfg_scale):
    """(prefix, target) pairs: the reference sampler's greedy one-token-per-step outputs (which
    the greedy check must accept) and perturbed copies (which it should mostly reject)."""
    pairs = []
    for prompt in PROMPTS:
        for n in (1, 3):
            target = ref.sampler(model, prompt, steps=n, gen_length=n, block_length=n, cfg_scale=cfg_scale,
                                 mask_id=MASK, eos_id=EOS, eot_id=EOT)
            pairs.append((prompt, target))
            pairs.append((prompt, [(t + 1) % VOCAB for t in target]))
    return pairs


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_greedy_check_matches_llada_with_and_without_cfg(model, cfg_scale):
    from model.likelihood import suffix_greedy

    pairs = greedy_targets(model, cfg_scale)
    theirs_ = [ref.suffix_greedy(model, p, t, cfg_scale=cfg_scale, mask_id=MASK) for p, t in pairs]
    ours_ = [suffix_greedy(model, p, t, cfg_scale=cfg_scale) for p, t in pairs]
    assert ours_ == theirs_
    assert any(theirs_) and not all(theirs_)


@pytest.mark.parametrize("length,rows", [(3, 4), (5, 4), (7, 8), (1, 4), (12, 16)])
def test_llada_mask_counts(length, rows):
    from model.likelihood import llada_mask_counts

    for k in range(1, length + 1):
        assert llada_mask_counts(k, length, rows).tolist() == ref.mask_counts(k, length, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_likelihood_matches_llada_on_the_same_masks(model, dtype, cfg_scale):
    """LLaDA's estimator fed our mask patterns gives our value: the softmax covers every logit
    (padding rows too), CFG and cross-entropy in the model's dtype, weight L/l, mini-batches."""
    from model.likelihood import _sample_rows, mc_loglikelihood

    m = build_model(tiny_config(), seed=0).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(dtype)
    for prefix, target in [([BOS, 5, 6], [7, 8, 9, 10, 11]), ([BOS, 20, 21, 22], [30, 31, 32])]:
        rows = _sample_rows(0, prefix, target, 8, 0, group=4)
        patterns = [[p - len(prefix) for p in r.masked] for r in rows]
        theirs_ = ref.loglikelihood(m, prefix, target, [patterns[:4], patterns[4:]], cfg_scale=cfg_scale, mask_id=MASK)
        ours_ = mc_loglikelihood(m, [(prefix, target)], mc_num=8, batch_size=4, cfg_scale=cfg_scale, seed=0,
                                 llada_batches=True)[0]
        assert ours_ == pytest.approx(theirs_, rel=1e-5, abs=1e-5)
        counts = [len(p) for p in patterns]
        assert counts[:4] == ref.mask_counts(counts[0], len(target), 4)  # each mini-batch: LLaDA's rule
