"""The one tiny model the tests share.

``tiny_model_config(**overrides)`` is the small LLaDA shape (2 layers, d_model 64, 4 heads,
vocabulary 256) that unit tests build; pass overrides for the one field a test is about
(``n_kv_heads=2`` for GQA, ``vocab_size=...`` to match a tokenizer). ``tiny_model`` builds it with
a seed. tests/conftest.py turns both into fixtures (``tiny_config``, ``tiny_model``).

Tests that need a *different* shape on purpose keep their own: the parity workers' 4-layer model
(tests/train/parity_worker.py, every layout must split it), configs/model/tiny.yaml
(when a test compares against a ``python -m train`` run, named on its command line), LLaDA-8B (planner and memory tests).
"""

from __future__ import annotations

from model.config import ModelConfig

TINY = dict(
    d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, vocab_size=256,
    embedding_size=256, max_sequence_length=128, mask_token_id=2, eos_token_id=1,
    pad_token_id=1, bos_token_id=0,
)


def tiny_model_config(**overrides) -> ModelConfig:
    """The shared tiny ModelConfig, with ``overrides`` applied (unknown keys fail in ModelConfig)."""
    return ModelConfig(**{**TINY, **overrides})


SPLITTABLE = dict(
    n_layers=4, n_kv_heads=2, vocab_size=128, embedding_size=128, max_sequence_length=32,
    mask_token_id=127, eos_token_id=126, pad_token_id=126, bos_token_id=125,
)


def splittable_config(**overrides) -> ModelConfig:
    """The tiny model with 4 layers and GQA (2 key/value heads): a shape every TP and PP split of
    up to 4 ranks can cut (layout validation and the parallel builder's unit tests)."""
    return tiny_model_config(**{**SPLITTABLE, **overrides})


def tiny_model(seed: int = 0, **overrides):
    """A freshly initialised tiny LLaDA model (``model.llada.build_model``) in train mode on CPU."""
    from model.llada import build_model

    return build_model(tiny_model_config(**overrides), seed=seed)
