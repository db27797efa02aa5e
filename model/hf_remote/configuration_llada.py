"""LLaDA configuration for Hugging Face ``transformers`` (remote code, written for difftron).

Reads and writes LLaDA's ``config.json`` keys (``d_model``, ``n_layers``, ``n_heads``, ...), and
exposes the standard ``hidden_size`` / ``num_hidden_layers`` / ``num_attention_heads`` names as
aliases. Works under transformers 4.4x-4.5x and 5.x. Self-contained: imports only transformers.
"""

from transformers import PretrainedConfig

# The architecture flags of LLaDA's config.json. Only these values are implemented by
# modeling_llada.py; anything else is rejected when the config is built.
LLADA_ARCHITECTURE = {
    "activation_type": "silu",
    "alibi": False,
    "attention_layer_norm": False,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "include_bias": False,
    "include_qkv_bias": False,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "rope": True,
    "scale_logits": False,
    "weight_tying": False,
}


class LLaDAConfig(PretrainedConfig):
    """Configuration of a LLaDA masked-diffusion language model (bidirectional LLaMA-style)."""

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=None,
        mlp_hidden_size=None,
        mlp_ratio=4,
        vocab_size=126464,
        embedding_size=None,
        max_sequence_length=4096,
        rope_theta=500000.0,
        rope_full_precision=True,
        rms_norm_eps=1e-5,
        mask_token_id=126336,
        init_std=0.02,
        init_fn="mitchell",
        init_device="meta",
        init_cutoff_factor=None,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        residual_dropout=0.0,
        alibi_bias_max=8.0,
        attention_layer_norm_with_affine=True,
        flash_attention=False,
        multi_query_attention=None,
        precision="amp_bf16",
        use_cache=False,
        **kwargs,
    ):
        architecture = {key: kwargs.pop(key, value) for key, value in LLADA_ARCHITECTURE.items()}
        for key, value in architecture.items():
            if value != LLADA_ARCHITECTURE[key]:
                raise ValueError(
                    f"LLaDAConfig: {key}={value!r} is not supported "
                    f"(this modeling code implements only {key}={LLADA_ARCHITECTURE[key]!r})"
                )
        if multi_query_attention:
            n_kv_heads = 1
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_ratio * d_model if mlp_hidden_size is None else mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = vocab_size if embedding_size is None else embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = float(rope_theta)
        self.rope_full_precision = rope_full_precision
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        self.init_std = init_std
        self.init_fn = init_fn
        self.init_device = init_device
        self.init_cutoff_factor = init_cutoff_factor
        self.attention_dropout = attention_dropout
        self.embedding_dropout = embedding_dropout
        self.residual_dropout = residual_dropout
        self.alibi_bias_max = alibi_bias_max
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.flash_attention = flash_attention
        self.multi_query_attention = multi_query_attention
        self.precision = precision
        self.use_cache = use_cache
        for key, value in architecture.items():
            setattr(self, key, value)
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LLaDAConfig: n_heads ({self.n_heads}) must divide d_model ({self.d_model}) and "
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads"
            )
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    # Standard transformers names, as aliases of LLaDA's keys.
    @property
    def num_attention_heads(self):
        return self.n_heads

    @num_attention_heads.setter
    def num_attention_heads(self, value):
        self.n_heads = value

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value):
        self.n_layers = value

    @property
    def hidden_size(self):
        return self.d_model

    @hidden_size.setter
    def hidden_size(self, value):
        self.d_model = value

    @property
    def num_key_value_heads(self):
        return self.n_kv_heads

    @property
    def max_position_embeddings(self):
        return self.max_sequence_length

    @property
    def intermediate_size(self):
        return self.mlp_hidden_size


__all__ = ["LLaDAConfig"]
