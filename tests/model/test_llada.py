import pytest
import torch
import torch.nn.functional as F

from model.llada import apply_rope, build_model, rope_tables
from tests.conftest import tiny_model_config


def test_bidirectional_last_token_changes_first_logits():
    model = build_model(tiny_model_config(), seed=0)
    x = torch.randint(3, 256, (1, 16))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 7) % 250 + 3
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_rmsnorm_and_rope_match_reference_formulas():
    model = build_model(tiny_model_config(), seed=0)
    norm = model.transformer.blocks[0].attn_norm
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight))
    x = torch.randn(2, 5, 64)
    ref = norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-5)

    # HF-Llama rotate-half RoPE, written out directly
    hd, theta, s = 16, 500000.0, 7
    q = torch.randn(1, 2, s, hd)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat([ang, ang], -1)
    rot = torch.cat([-q[..., hd // 2:], q[..., : hd // 2]], -1)
    ref = q * emb.cos() + rot * emb.sin()
    cos, sin = rope_tables(torch.arange(s)[None], hd, theta)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref, atol=1e-6, rtol=1e-5)


def test_padding_mask_and_positions_make_padding_invisible():
    model = build_model(tiny_model_config(), seed=1)
    x = torch.randint(3, 256, (1, 10))
    with torch.no_grad():
        ref = model(x)
        # left padding by 4 with positions starting at 0 on the first real token
        padded = torch.cat([torch.full((1, 4), 1), x], 1)
        mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0).long()
        out = model(padded, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, 4:], ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_model(tiny_model_config(n_kv_heads=2), seed=2)
    mha = build_model(tiny_model_config(n_kv_heads=4), seed=3)
    state = gqa.state_dict()
    hd, groups = 16, 2
    for k, v in list(state.items()):
        if k.endswith("k_proj.weight") or k.endswith("v_proj.weight"):
            state[k] = v.view(2, hd, 64).repeat_interleave(groups, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(state)
    x = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_leaves_loss_and_grads_unchanged(mode):
    x = torch.randint(3, 256, (2, 12))
    target = torch.randint(3, 256, (2, 12))
    results = []
    for m in ("none", mode):
        model = build_model(tiny_model_config(), seed=4)
        model.set_activation_checkpointing(m)
        loss = F.cross_entropy(model(x).flatten(0, 1), target.flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_init_is_layout_independent_and_seeded():
    a = build_model(tiny_model_config(), seed=5).state_dict()
    b = build_model(tiny_model_config(), seed=5).state_dict()
    c = build_model(tiny_model_config(), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    assert torch.all(a["transformer.ln_f.weight"] == 1)
