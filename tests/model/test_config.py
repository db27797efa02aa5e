import pytest

from model.config import ModelConfig
from model.llada import build_model
from train.config import load_model_config
from tests.conftest import REPO


def test_llada_8b_parameter_count_on_meta():
    cfg = load_model_config(REPO / "configs" / "model" / "llada_8b.yaml")
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert cfg.num_params() == 8_015_581_184
    assert cfg.num_non_embedding_params() == 6_979_588_096
    assert cfg.num_matmul_params() == 7_497_318_400
    assert len(model.state_dict()) == 291


def test_llada_8b_flops_per_token_bidirectional():
    cfg = load_model_config(REPO / "configs" / "model" / "llada_8b.yaml")
    assert cfg.flops_per_token(4096) == pytest.approx(51.43e9, rel=1e-3)
    # the attention term is 12·L·d·s, not halved
    assert cfg.flops_per_token(4096) - cfg.flops_per_token(0) == 12 * 32 * 4096 * 4096


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(n_heads=5), "n_heads (5) must divide d_model"),
        (dict(n_kv_heads=3), "n_kv_heads (3) must divide n_heads"),
        (dict(embedding_size=100), "embedding_size (100) must be >= vocab_size"),
        (dict(mask_token_id=999999), "mask_token_id (999999) is outside the vocabulary"),
        (dict(include_bias=True), "include_bias"),
        (dict(weight_tying=True), "weight_tying"),
    ],
)
def test_invalid_model_configs(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**overrides)
