"""LLaDA's reverse process: masks all filled, prompt kept, determinism, block order, padding."""

import pytest
import torch

from model.config import ModelConfig
from model.llada import build_model
from model.sampling import cut_at_stop_strings, generate, left_pad, num_transfer_tokens, positions_from_mask
from tests.tiny import tiny_model_config

MASK, EOS = 2, 1


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model_config(
        d_model=32, n_kv_heads=2, mlp_hidden_size=64, vocab_size=50, embedding_size=64,
        mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, init_std=0.3,
    )
    return build_model(cfg, seed=0).eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]


def test_num_transfer_tokens_splits_evenly_remainder_first():
    counts = num_transfer_tokens(torch.ones(2, 10, dtype=torch.bool), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [3, 3, 2, 2]]
    assert num_transfer_tokens(torch.ones(1, 3, dtype=torch.bool), 3).tolist() == [[1, 1, 1]]


def test_left_pad_and_positions():
    ids, mask = left_pad([[4, 5], [6]], pad_id=1)
    assert ids.tolist() == [[4, 5], [1, 6]] and mask.tolist() == [[1, 1], [0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1], [0, 0]]
    # a right-padded tensor is re-packed to the left
    ids2, _ = left_pad(torch.tensor([[4, 5], [6, 1]]), pad_id=1, attention_mask=torch.tensor([[1, 1], [1, 0]]))
    assert ids2.tolist() == ids.tolist()


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (1.0, 0.0), (0.7, 1.5)])
def test_restrict_vocab_no_mask_remains_and_prompt_unchanged(model, remasking, temperature, cfg_scale):
    out = generate(model, PROMPTS, gen_length=8, steps=4, block_length=4, temperature=temperature,
                   cfg_scale=cfg_scale, remasking=remasking, seed=1, restrict_vocab=True)
    assert out.shape == (3, 7 + 8)
    assert not (out == MASK).any()
    assert (out < model.config.vocab_size).all()
    ids, _ = left_pad(PROMPTS, pad_id=EOS)
    assert torch.equal(out[:, :7], ids)


def test_fixed_seed_same_output_and_seed_matters(model):
    kw = dict(gen_length=16, steps=16, block_length=8, temperature=1.0, seed=7)
    a = generate(model, PROMPTS, **kw)
    b = generate(model, PROMPTS, **kw)
    assert torch.equal(a, b)
    c = generate(model, PROMPTS, **{**kw, "seed": 8})
    assert not torch.equal(a, c)


def test_blocks_filled_left_to_right(model):
    gen, block = 12, 4
    seen = []

    def record(b, s, x):
        seen.append((b, (x[:, -gen:] == MASK).clone()))

    generate(model, PROMPTS, gen_length=gen, steps=6, block_length=block, temperature=1.0, seed=0, callback=record)
    assert len(seen) == 6
    for b, masked in seen:
        assert not masked[:, : (b + 1) * block][:, : b * block].any()  # earlier blocks complete
        assert masked[:, (b + 1) * block:].all()  # later blocks untouched
    for b in range(3):
        last = [m for bb, m in seen if bb == b][-1]
        assert not last[:, : (b + 1) * block].any()  # a block is complete at its last step


def test_one_token_per_step_is_committed(model):
    counts = []
    prev = [None]

    def record(b, s, x):
        m = (x[:, -8:] == MASK).sum(1)
        counts.append((prev[0] if prev[0] is not None else torch.full_like(m, 8)) - m)
        prev[0] = m

    generate(model, PROMPTS, gen_length=8, steps=8, block_length=8, seed=0, callback=record)
    assert all((c == 1).all() for c in counts)


@pytest.mark.parametrize("temperature,remasking,cfg_scale", [(0.0, "low_confidence", 0.0), (1.0, "random", 0.0), (0.8, "low_confidence", 1.0)])
def test_padding_does_not_change_output(model, temperature, remasking, cfg_scale):
    kw = dict(gen_length=8, steps=8, block_length=4, temperature=temperature, remasking=remasking, cfg_scale=cfg_scale, seed=3)
    alone = generate(model, [PROMPTS[0]], **kw)
    batched = generate(model, [PROMPTS[0], PROMPTS[1]], **kw)  # row 0 gets 4 pads on the left
    assert torch.equal(alone[0, -8:], batched[0, -8:])
    assert (batched[0, :4] == EOS).all()


def test_logits_eos_inf_never_emits_eos(model):
    out = generate(model, PROMPTS, gen_length=16, steps=16, block_length=16, temperature=2.0, seed=0, logits_eos_inf=True)
    assert not (out[:, -16:] == EOS).any()


def test_confidence_eos_eot_inf_commits_eos_last():
    # positions 1-2 predict EOS with high confidence, positions 3-4 predict token 9 with less
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=16, vocab_size=16,
                      embedding_size=16, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=0)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = cfg
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, attention_mask=None, position_ids=None):
            logits = torch.zeros(*ids.shape, 16)
            logits[:, 1:3, EOS] = torch.tensor([9.0, 8.0])[None, :]
            logits[:, 3:5, 9] = torch.tensor([3.0, 2.0])[None, :]
            return logits

    def first_commit(**kw):
        seen = []
        out = generate(Fixed(), [[5]], gen_length=4, steps=4, block_length=4,
                       callback=lambda b, s, x: seen.append(x[0, 1:].tolist()), **kw)
        assert out[0, 1:].tolist() == [EOS, EOS, 9, 9]
        return seen[0]

    assert first_commit() == [EOS, MASK, MASK, MASK]
    assert first_commit(confidence_eos_eot_inf=True) == [MASK, MASK, 9, MASK]


def test_bad_options_raise(model):
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(model, PROMPTS, gen_length=10, steps=10, block_length=4)
    with pytest.raises(ValueError, match="number of blocks"):
        generate(model, PROMPTS, gen_length=8, steps=3, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        generate(model, PROMPTS, gen_length=4, steps=4, block_length=4, remasking="top")


def test_cut_at_stop_strings():
    assert cut_at_stop_strings("a\n\nb Q: c", ["Q:", "\n\n"]) == "a"
    assert cut_at_stop_strings("abc", []) == "abc"
